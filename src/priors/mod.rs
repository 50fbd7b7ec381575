//! The frozen inputs of the identity learner, computed once per photo: the photo itself (and its
//! FFHQ-aligned face crop), its face-recognition feature, its face and hair masks, and the
//! celebrity-name basis.

pub mod align;
pub mod celeb_basis;
pub mod face_feature;
pub mod masks;
pub mod photo;
pub mod pose;
