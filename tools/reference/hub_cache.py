"""Checks that huggingface_hub reads a hub cache that `stableid` filled (src/weights/hub/).

Usage: hub_cache.py CACHE_DIR REPO_ID FILE [FILE ...]

For each FILE, `try_to_load_from_cache` must find it in the snapshot of `main` and give the
bytes on disk; `scan_cache_dir` must list the repository with `main` pointing at that snapshot,
every file in it, and no warnings (broken links, unknown folders). Exits non-zero otherwise.

Not a fixture maker: run it by hand on a cache filled by a download, e.g. the tiny model served by
tests/hub.rs's server (keep the test's HF_HOME), or a real first run:
    stableid generate "a cat" --steps 1
    tools/reference/.venv/bin/python tools/reference/hub_cache.py ~/.cache/huggingface/hub \
        stabilityai/stable-diffusion-2-1-base model_index.json unet/diffusion_pytorch_model.safetensors
"""

import os
import sys

from huggingface_hub import scan_cache_dir, try_to_load_from_cache


def main() -> None:
    cache, repo_id, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    commit = open(os.path.join(cache, "models--" + repo_id.replace("/", "--"), "refs", "main")).read()
    for name in files:
        path = try_to_load_from_cache(repo_id, name, cache_dir=cache)
        assert isinstance(path, str), f"{name}: not found by try_to_load_from_cache ({path!r})"
        assert f"/snapshots/{commit}/" in path, f"{name}: {path} is not in main's snapshot {commit}"
        assert os.path.isfile(path), f"{name}: {path} does not lead to a file"
        print(f"ok  {name} -> {os.path.realpath(path)}")
    info = scan_cache_dir(cache)
    assert not info.warnings, f"scan_cache_dir warnings: {info.warnings}"
    (repo,) = [r for r in info.repos if r.repo_id == repo_id]
    (revision,) = [r for r in repo.revisions if r.commit_hash == commit]
    assert "main" in revision.refs, f"refs of {commit}: {revision.refs}"
    listed = {str(f.file_path.relative_to(revision.snapshot_path)) for f in revision.files}
    missing = set(files) - listed
    assert not missing, f"scan_cache_dir does not list {missing}"
    print(f"ok  scan_cache_dir: {repo_id} {repo.size_on_disk_str}, {repo.nb_files} files, main = {commit}")


if __name__ == "__main__":
    main()
