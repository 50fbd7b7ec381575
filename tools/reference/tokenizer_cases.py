"""The real CLIP BPE vocabulary and the token ids transformers' `CLIPTokenizer` gives for awkward prompts.

Writes tests/fixtures/tokenizer/:
- vocab.json, merges.txt: CLIP's vocabulary built from open_clip's bpe_simple_vocab_16e6.txt.gz the
  way CLIP builds it (256 byte characters, the same with `</w>`, one token per merge, then
  <|startoftext|> = 49406 and <|endoftext|> = 49407), checked against ids Stable Diffusion uses.
- tokenizer_config.json, special_tokens_map.json: modelled on stabilityai/stable-diffusion-2-1-base
  (padding with "!", id 0, set in special_tokens_map.json).
- sd1/{tokenizer_config.json, special_tokens_map.json}: modelled on SD 1.x (padding with
  <|endoftext|>); the test puts them next to a copy of the vocabulary.
- cases.json: for each tokenizer folder (SD2, SD1, each with and without the placeholders v1* v2*,
  and the tiny model's tokenizer) and each prompt: the ids diffusers' pipelines feed the text
  encoder (`padding="max_length", truncation=True`), `tokenizer.tokenize(prompt)`, and whether the
  pipeline would warn that the prompt was truncated.

The tokenizer is transformers 5's `CLIPTokenizer` (backed by `tokenizers`), loaded from vocab.json +
merges.txt as Stable Diffusion's hub folders ship it. Deterministic: no randomness involved.
Run from the repository root: /work/venv/bin/python tools/reference/tokenizer_cases.py
"""
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

import open_clip
import tokenizers
import transformers
from transformers import CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, REPO, TINY_SD, bytes_to_unicode  # noqa: E402

OUT = FIXTURES / "tokenizer"
PLACEHOLDERS = ["v1*", "v2*"]

# Token ids of the SD 1.x / 2.x tokenizer (openai/clip-vit-large-patch14's vocabulary).
KNOWN_IDS = {
    "!": 0,
    "a</w>": 320,
    "photo</w>": 1125,
    "of</w>": 539,
    "cat</w>": 2368,
    "dog</w>": 1929,
    ",</w>": 267,
    "<|startoftext|>": 49406,
    "<|endoftext|>": 49407,
}

# Special tokens written the way the hub's tokenizer_config.json files write them.
def added_token(content, typed):
    tok = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **tok} if typed else tok


def tokenizer_config(pad):
    return {
        "add_prefix_space": False,
        "bos_token": added_token("<|startoftext|>", True),
        "do_lower_case": True,
        "eos_token": added_token("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token("<|endoftext|>", True),
    }


def special_tokens_map(pad):
    return {
        "bos_token": added_token("<|startoftext|>", False),
        "eos_token": added_token("<|endoftext|>", False),
        "pad_token": pad,
        "unk_token": added_token("<|endoftext|>", False),
    }


def write_vocabulary():
    bpe = gzip.open(Path(open_clip.__path__[0]) / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8")
    merges = bpe.split("\n")[1 : 49152 - 256 - 2 + 1]  # CLIP's slice: the first line is a header
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {tok: i for i, tok in enumerate(vocab)}
    assert len(ids) == len(vocab) == 49408
    for tok, i in KNOWN_IDS.items():
        assert ids[tok] == i, (tok, ids[tok], i)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def write_configs():
    for folder, pad in [(OUT, "!"), (OUT / "sd1", "<|endoftext|>")]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(pad), indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map(pad), indent=2) + "\n")


LONG = (
    "a highly detailed portrait photograph of a smiling person standing in a sunlit meadow full of wild "
    "flowers, golden hour, soft rim light, shallow depth of field, 85mm lens, bokeh, film grain, muted "
    "colors, by a famous photographer, award winning, trending on artstation, ultra realistic, 8k, sharp "
    "focus, intricate details, cinematic composition, volumetric fog, dramatic sky"
)

PROMPTS = [
    "a photo of a cat",
    "",
    "A PHOTO OF A CAT",
    "a photo of a person, highly detailed, 8k, trending on artstation, by greg rutkowski",
    # placeholders (plain BPE where they are not added)
    "a photo of v1* v2*",
    "v1* v2*, smiling",
    "V1* v2*",
    "v1*v2*",
    "xv1*",
    "v1*x v2*y",
    "v1* v2* as a knight, v1* v2* in the snow",
    "v1*! !v2*",
    "v1 * v2 *",
    "v1** v2",
    "a painting of V1* V2* in the style of van gogh",
    # accents, normalisation, scripts
    "café",
    "cafe\u0301",
    "naïve résumé Ångström façade",
    "e\u0301\u0323 and e\u0323\u0301",
    "\u2126 ohm sign, \u212b angstrom sign, \u00c5 a-ring",
    "\u0301 a combining accent alone",
    "北京的天安门广场",
    "東京タワー、夜景。",
    "Привет, мир! ЗДРАВСТВУЙ",
    "ΣΊΣΥΦΟΣ and ὈΔΥΣΣΕΎΣ",
    "İstanbul and DİYARBAKIR",
    "ß straße STRASSE \u1e9e",
    "\u01c4 \u01c5 \u01c6 digraphs",
    "한국어 텍스트",
    "Mixed中文and English",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３",
    "ﬁ ligature ﬀ",
    "x² y³ ½ ⅓ ٣ ४ Ⅻ",
    # emoji and invisible characters
    "a dog 🐶 with a 👨\u200d👩\u200d👧 family",
    "😀😀😀 🏳️\u200d🌈",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "a\u0000b\u001cc\u007fd",
    # whitespace
    "a  b\t\tc\n\nd\r\ne",
    "   leading and trailing spaces   ",
    "\t\n ",
    "\u00a0nbsp\u2003em space\u3000ideographic\u2028line sep",
    # punctuation, numbers, contractions
    "hello!!! what??? wait...",
    "wow!!!",
    "!",
    "a!b",
    "punctuation: ,.;:!?-_=+()[]{}<>/\\|@#$%^&*~`\"",
    "((masterpiece)), [best quality], {detailed}, (cat:1.2)",
    "1234 3.14 1,000,000 -5 2nd 1st 0123456789",
    "it's don't we're they've i'm you'll he'd",
    "IT'S DON'T WE'RE THEY'VE I'M YOU'LL HE'D",
    "''s 'S'' rock'n'roll o'clock '",
    "it’s a curly apostrophe",
    "tom &amp; jerry &lt;3 &quot;quoted&quot; &#39;",
    "https://example.com/path?q=1&x=2 email@example.com #hashtag @mention",
    "snake_case and kebab-case and CamelCase",
    # special tokens in the text
    "<|startoftext|>a photo<|endoftext|>",
    "<|endoftext|>>",
    "<|ENDOFTEXT|>> and <|StartOfText|>",
    "a<|endoftext|>b",
    # long words and prompts
    "a" * 60,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "tom cruise, emma watson, barack obama, taylor swift",
    "a " * 75,
    "a " * 76,
    LONG,
    LONG + ", " + LONG,
    "a photo of v1* v2*, " + LONG,
]

# Prompts for the tiny model's tokenizer (400 merges): checks that its folder loads like the real one.
TINY_PROMPTS = [
    "a photo of a cat",
    "",
    "A painting of v1* v2* in the style of Van Gogh!!!",
    "v1* v2*, smiling",
    LONG,
]


def prepared_folder(tmp, name, vocab_dir, config_dir):
    """A tokenizer folder as SD ships it: vocab.json, merges.txt and the config files (no tokenizer.json)."""
    folder = Path(tmp) / name
    folder.mkdir()
    for file in ["vocab.json", "merges.txt"]:
        shutil.copy(vocab_dir / file, folder / file)
    for file in ["tokenizer_config.json", "special_tokens_map.json"]:
        if (config_dir / file).exists():
            shutil.copy(config_dir / file, folder / file)
    return folder


def encode(tok, prompt):
    """What diffusers' StableDiffusionPipeline.encode_prompt does with a prompt."""
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    untruncated = tok(prompt, padding="longest").input_ids
    truncated = len(untruncated) >= len(ids) and untruncated != ids
    return {"text": prompt, "ids": ids, "tokens": tok.tokenize(prompt), "truncated": truncated}


def suite(name, folder, vocab_dir, config_dir, prompts, placeholders):
    tok = CLIPTokenizer.from_pretrained(str(folder))
    base = len(tok)
    if placeholders:
        assert tok.add_tokens(placeholders) == len(placeholders)  # as diffusers' load_textual_inversion does
    return {
        "name": name,
        "vocab_dir": str(vocab_dir.relative_to(FIXTURES)),
        "config_dir": str(config_dir.relative_to(FIXTURES)),
        "placeholders": placeholders,
        "placeholder_ids": tok.convert_tokens_to_ids(placeholders),
        "base_vocab_size": base,
        "len": len(tok),
        "max_length": tok.model_max_length,
        "pad_id": tok.pad_token_id,
        "cases": [encode(tok, p) for p in prompts],
    }


def main():
    write_vocabulary()
    write_configs()
    tiny = TINY_SD / "tokenizer"
    suites = []
    with tempfile.TemporaryDirectory() as tmp:
        sd2 = prepared_folder(tmp, "sd2", OUT, OUT)
        sd1 = prepared_folder(tmp, "sd1", OUT, OUT / "sd1")
        tiny_folder = prepared_folder(tmp, "tiny", tiny, tiny)
        for placeholders in [[], PLACEHOLDERS]:
            suffix = "+placeholders" if placeholders else ""
            suites.append(suite("sd2" + suffix, sd2, OUT, OUT, PROMPTS, placeholders))
            suites.append(suite("sd1" + suffix, sd1, OUT, OUT / "sd1", PROMPTS, placeholders))
            suites.append(suite("tiny" + suffix, tiny_folder, tiny, tiny, TINY_PROMPTS, placeholders))
    out = {
        "generated_by": f"tools/reference/tokenizer_cases.py (transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__})",
        "known_ids": KNOWN_IDS,
        "suites": suites,
    }
    path = OUT / "cases.json"
    path.write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KiB) and the vocabulary in {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
