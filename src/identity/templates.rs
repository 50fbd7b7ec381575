//! Caption templates for the learner: each step captions the photo with one of these, `{}`
//! replaced by the placeholders `v1* v2*` (docs/method.md, "Captions").

/// Short ImageNet-style captions of a single subject.
pub const TEMPLATES: [&str; 80] = [
    "a photo of {}",
    "a photo of a {}",
    "a photo of the {}",
    "a close-up photo of {}",
    "a close-up photo of the {}",
    "a cropped photo of {}",
    "a cropped photo of the {}",
    "a good photo of {}",
    "a good photo of the {}",
    "a nice photo of {}",
    "a clean photo of {}",
    "a bright photo of {}",
    "a dark photo of {}",
    "a blurry photo of {}",
    "a sharp photo of {}",
    "a bad photo of {}",
    "a low resolution photo of {}",
    "a high resolution photo of {}",
    "a jpeg photo of {}",
    "a pixelated photo of {}",
    "a cool photo of {}",
    "a weird photo of {}",
    "a small photo of {}",
    "a large photo of {}",
    "a rendition of {}",
    "a rendering of {}",
    "a portrait of {}",
    "a portrait photo of {}",
    "a headshot of {}",
    "a face photo of {}",
    "a picture of {}",
    "an image of {}",
    "a snapshot of {}",
    "a selfie of {}",
    "a studio photo of {}",
    "a candid photo of {}",
    "a professional photo of {}",
    "an amateur photo of {}",
    "a color photo of {}",
    "a black and white photo of {}",
    "a film photo of {}",
    "a digital photo of {}",
    "a recent photo of {}",
    "an old photo of {}",
    "a framed photo of {}",
    "a printed photo of {}",
    "a zoomed-in photo of {}",
    "a well-lit photo of {}",
    "a softly lit photo of {}",
    "a front-facing photo of {}",
    "a passport photo of {}",
    "a profile picture of {}",
    "a photo showing {}",
    "a photo featuring {}",
    "a photograph of {}",
    "a close-up photograph of {}",
    "a detailed photograph of {}",
    "a natural photograph of {}",
    "a casual photograph of {}",
    "a simple photograph of {}",
    "an illustration of {}",
    "a drawing of {}",
    "a sketch of {}",
    "a painting of {}",
    "an oil painting of {}",
    "a watercolor of {}",
    "a digital painting of {}",
    "a sculpture of {}",
    "a cartoon of {}",
    "a caricature of {}",
    "a depiction of {}",
    "a likeness of {}",
    "a face of {}",
    "the face of {}",
    "{}",
    "{}, a photo",
    "{}, a close-up",
    "{}, a portrait",
    "{} in a photo",
    "{} looking at the camera",
];

/// The caption for template `index` with `subject` (e.g. "v1* v2*") filled in.
pub fn caption(index: usize, subject: &str) -> String {
    TEMPLATES[index % TEMPLATES.len()].replace("{}", subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_names_the_subject_once() {
        for t in TEMPLATES {
            assert_eq!(t.matches("{}").count(), 1, "{t}");
        }
        assert_eq!(caption(0, "v1* v2*"), "a photo of v1* v2*");
    }
}
