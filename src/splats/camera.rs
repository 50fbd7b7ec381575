//! Pinhole cameras in the convention of 3DGS and COLMAP: camera x right, y down, z forward;
//! the principal point at the image centre; pixel centres at `+0.5`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub type Vec3 = [f64; 3];

fn sub(a: Vec3, b: Vec3) -> Vec3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn dot(a: Vec3, b: Vec3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: Vec3, b: Vec3) -> Vec3 {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn scale(a: Vec3, s: f64) -> Vec3 {
    [a[0] * s, a[1] * s, a[2] * s]
}

/// `a / |a|`, or `None` for a (near) zero or non-finite vector.
fn normalized(a: Vec3) -> Option<Vec3> {
    let norm = dot(a, a).sqrt();
    (norm > 1e-12 && norm.is_finite()).then(|| scale(a, 1.0 / norm))
}

/// A perspective camera: world-to-camera `x_cam = rotation x + translation`.
#[derive(Debug, Clone, PartialEq)]
pub struct Camera {
    /// World-to-camera rotation, rows = camera axes (right, down, forward) in world coordinates.
    pub rotation: [Vec3; 3],
    pub translation: Vec3,
    /// Horizontal and vertical field of view, radians.
    pub fov_x: f64,
    pub fov_y: f64,
    pub width: usize,
    pub height: usize,
}

impl Camera {
    /// A camera at `eye` looking at `target`, with `up` pointing up in the image; `fov_y` in
    /// radians, the horizontal field of view following from the aspect ratio.
    pub fn look_at(eye: Vec3, target: Vec3, up: Vec3, fov_y: f64, width: usize, height: usize) -> Result<Self> {
        check_image(width, height)?;
        if !(fov_y > 0.0 && fov_y < std::f64::consts::PI) {
            return Err(Error::setting(
                "fov",
                fov_y.to_degrees(),
                "the field of view must be between 0 and 180 degrees",
            ));
        }
        let forward = normalized(sub(target, eye))
            .ok_or_else(|| Error::Input("degenerate camera: the eye and the target coincide".into()))?;
        let right = normalized(cross(forward, up)).ok_or_else(|| {
            Error::Input("degenerate camera: the view direction is parallel to the up vector (or up is zero)".into())
        })?;
        let down = cross(forward, right);
        let rotation = [right, down, forward];
        let translation = rotation.map(|axis| -dot(axis, eye));
        let fov_x = 2.0 * ((fov_y / 2.0).tan() * width as f64 / height as f64).atan();
        Ok(Self { rotation, translation, fov_x, fov_y, width, height })
    }

    /// A camera at `position` on an orbit, looking at the orbit's target; `fov_y` in radians.
    pub fn orbit(position: &OrbitPosition, fov_y: f64, width: usize, height: usize) -> Result<Self> {
        let OrbitPosition { target, up, radius, elevation, azimuth } = *position;
        if !(radius > 0.0 && radius.is_finite()) {
            return Err(Error::setting("radius", radius, "the orbit radius must be a positive number"));
        }
        if elevation.is_nan() || elevation.abs() >= 90.0 {
            return Err(Error::setting(
                "elevation",
                elevation,
                "the elevation must lie strictly between -90 and 90 degrees",
            ));
        }
        let axis =
            normalized(up).ok_or_else(|| Error::setting("up", format!("{up:?}"), "the up vector must not be zero"))?;
        // Two unit vectors spanning the orbit plane.
        let helper = if axis[0].abs() < 0.9 { [1.0, 0.0, 0.0] } else { [0.0, 1.0, 0.0] };
        let first = normalized(sub(helper, scale(axis, dot(helper, axis)))).expect("helper is not parallel to axis");
        let second = cross(axis, first);
        let (el, az) = (elevation.to_radians(), azimuth.to_radians());
        let direction = [0, 1, 2].map(|i| el.cos() * (az.cos() * first[i] + az.sin() * second[i]) + el.sin() * axis[i]);
        let eye = [0, 1, 2].map(|i| target[i] + radius * direction[i]);
        Self::look_at(eye, target, axis, fov_y, width, height)
    }

    /// Focal lengths in pixels.
    pub fn focal(&self) -> (f64, f64) {
        (self.width as f64 / (2.0 * (self.fov_x / 2.0).tan()), self.height as f64 / (2.0 * (self.fov_y / 2.0).tan()))
    }

    /// The camera centre in world coordinates: `-rotation^T translation`.
    pub fn position(&self) -> Vec3 {
        let r = &self.rotation;
        let t = self.translation;
        [0, 1, 2].map(|j| -(r[0][j] * t[0] + r[1][j] * t[1] + r[2][j] * t[2]))
    }

    /// The camera of a 3DGS `cameras.json` entry.
    pub fn from_json(entry: &CameraJson) -> Result<Self> {
        check_image(entry.width, entry.height)?;
        if !(entry.fx > 0.0 && entry.fy > 0.0) {
            return Err(Error::Input(format!("camera {}: focal lengths must be positive", entry.id)));
        }
        let c2w = entry.rotation;
        // The world-to-camera rotation is the transpose of the stored camera-to-world one.
        let rotation = [0, 1, 2].map(|i| [c2w[0][i], c2w[1][i], c2w[2][i]]);
        let orthonormal =
            (0..3).all(|i| (0..3).all(|j| (dot(rotation[i], rotation[j]) - f64::from(i == j)).abs() < 1e-4));
        if !orthonormal || entry.position.iter().any(|v| !v.is_finite()) {
            return Err(Error::Input(format!(
                "camera {}: the rotation is not orthonormal or the position is not finite",
                entry.id
            )));
        }
        let translation = rotation.map(|axis| -dot(axis, entry.position));
        Ok(Self {
            rotation,
            translation,
            fov_x: 2.0 * (entry.width as f64 / (2.0 * entry.fx)).atan(),
            fov_y: 2.0 * (entry.height as f64 / (2.0 * entry.fy)).atan(),
            width: entry.width,
            height: entry.height,
        })
    }

    /// This camera as a 3DGS `cameras.json` entry.
    pub fn to_json(&self, id: usize, img_name: &str) -> CameraJson {
        let (fx, fy) = self.focal();
        let r = &self.rotation;
        CameraJson {
            id,
            img_name: img_name.to_string(),
            width: self.width,
            height: self.height,
            position: self.position(),
            rotation: [0, 1, 2].map(|i| [r[0][i], r[1][i], r[2][i]]),
            fx,
            fy,
        }
    }
}

fn check_image(width: usize, height: usize) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::setting("size", format!("{width}x{height}"), "images need at least one pixel per side"));
    }
    Ok(())
}

/// A place on an orbit around `target`, whose axis is `up` (up in the images too): `elevation`
/// degrees above the orbit plane, `azimuth` degrees around the axis from the first axis
/// perpendicular to it, at distance `radius`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrbitPosition {
    pub target: Vec3,
    pub up: Vec3,
    pub radius: f64,
    pub elevation: f64,
    pub azimuth: f64,
}

/// One entry of the `cameras.json` that 3DGS writes beside its PLY (`utils/camera_utils.py`
/// `camera_to_JSON`): `rotation` is camera-to-world, `position` the camera centre.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CameraJson {
    pub id: usize,
    pub img_name: String,
    pub width: usize,
    pub height: usize,
    pub position: Vec3,
    pub rotation: [Vec3; 3],
    pub fx: f64,
    pub fy: f64,
}

/// The entries of a 3DGS `cameras.json` (a list of entries, or a single one), each checked to
/// make a camera.
pub fn read_camera_entries(path: &Path) -> Result<Vec<CameraJson>> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<CameraJson>),
        One(CameraJson),
    }
    let text = crate::io::read_text_bounded(path, 64 << 20)
        .map_err(|e| Error::Input(format!("cannot read cameras {}: {e}", path.display())))?;
    let parsed = serde_json::from_str::<OneOrMany>(&text)
        .map_err(|e| Error::Input(format!("{}: not a 3DGS cameras.json ({e})", path.display())))?;
    let entries = match parsed {
        OneOrMany::Many(entries) => entries,
        OneOrMany::One(entry) => vec![entry],
    };
    if entries.is_empty() {
        return Err(Error::Input(format!("{}: no cameras in the file", path.display())));
    }
    for entry in &entries {
        Camera::from_json(entry)?;
    }
    Ok(entries)
}

/// The cameras of a 3DGS `cameras.json` (a list of entries, or a single one).
pub fn read_cameras_json(path: &Path) -> Result<Vec<Camera>> {
    read_camera_entries(path)?.iter().map(Camera::from_json).collect()
}

/// Where an orbit of views looks and how far it is: the per-axis median of the Gaussians'
/// centres, and the 95th-percentile distance of the centres from it (robust to stray
/// Gaussians far out).
pub fn scene_bounds(means: &[[f64; 3]]) -> Result<(Vec3, f64)> {
    if means.is_empty() {
        return Err(Error::Input("the scene holds no Gaussians".into()));
    }
    let median = |axis: usize| {
        let mut values: Vec<f64> = means.iter().map(|m| m[axis]).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let centre = [median(0), median(1), median(2)];
    let mut distances: Vec<f64> = means.iter().map(|m| dot(sub(*m, centre), sub(*m, centre)).sqrt()).collect();
    distances.sort_by(f64::total_cmp);
    let extent = distances[(distances.len() * 95 / 100).min(distances.len() - 1)];
    Ok((centre, extent))
}

/// An orbit of views around a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Orbit {
    pub views: usize,
    /// Distance from the scene's centre; `None`: far enough for the scene to fill the view.
    pub radius: Option<f64>,
    /// Degrees above the orbit plane.
    pub elevation: f64,
    /// Vertical field of view, degrees.
    pub fov: f64,
    pub width: usize,
    pub height: usize,
    /// The orbit's axis, up in the images.
    pub up: Vec3,
}

/// `orbit.views` cameras evenly spaced in azimuth around the Gaussians with centres `means`,
/// refusing cameras inside the scene (within its 95th-percentile radius).
pub fn orbit_cameras(means: &[[f64; 3]], orbit: &Orbit) -> Result<Vec<Camera>> {
    if orbit.views == 0 {
        return Err(Error::setting("views", 0, "render at least one view"));
    }
    if !(orbit.fov > 0.0 && orbit.fov < 180.0) {
        return Err(Error::setting("fov", orbit.fov, "the field of view must be between 0 and 180 degrees"));
    }
    let (centre, extent) = scene_bounds(means)?;
    let half_fov = (orbit.fov / 2.0).to_radians();
    let radius = orbit.radius.unwrap_or(1.1 * extent.max(1e-6) / half_fov.sin());
    if radius <= extent {
        return Err(Error::setting(
            "radius",
            radius,
            format!("the cameras would be inside the scene (95% of it lies within {extent:.3} of its centre): use a larger radius"),
        ));
    }
    (0..orbit.views)
        .map(|view| {
            let azimuth = 360.0 * view as f64 / orbit.views as f64;
            let position = OrbitPosition { target: centre, up: orbit.up, radius, elevation: orbit.elevation, azimuth };
            Camera::orbit(&position, orbit.fov.to_radians(), orbit.width, orbit.height)
        })
        .collect()
}

/// The point nearest to every camera's viewing axis (least squares): where views of one object
/// look. Refused when the axes are (nearly) parallel, as with a single camera.
pub fn common_target(cameras: &[Camera]) -> Result<Vec3> {
    // Sum over cameras of (I - d d^T) x = (I - d d^T) c, with d the viewing direction, c the centre.
    let mut matrix = [[0.0; 3]; 3];
    let mut rhs = [0.0; 3];
    for camera in cameras {
        let d = camera.rotation[2];
        let c = camera.position();
        for i in 0..3 {
            for j in 0..3 {
                let projector = f64::from(i == j) - d[i] * d[j];
                matrix[i][j] += projector;
                rhs[i] += projector * c[j];
            }
        }
    }
    let det = dot(matrix[0], cross(matrix[1], matrix[2]));
    let scale = (0..3).map(|i| matrix[i][i]).sum::<f64>().max(1e-12);
    if cameras.len() < 2 || det.abs() < 1e-6 * scale.powi(3) {
        return Err(Error::Input(
            "the cameras' viewing axes do not meet (fewer than two cameras, or all looking the same way): \
             pass a starting cloud"
                .into(),
        ));
    }
    // Cramer's rule on the symmetric 3 x 3 system.
    let column = |k: usize| -> f64 {
        let mut m = matrix;
        for (row, value) in m.iter_mut().zip(rhs) {
            row[k] = value;
        }
        dot(m[0], cross(m[1], m[2])) / det
    };
    Ok([column(0), column(1), column(2)])
}

/// The scene extent 3DGS derives from its cameras (`getNerfppNorm`): 1.1 times the largest
/// distance of a camera centre from their mean. It scales the position learning rate and the
/// densification thresholds.
pub fn cameras_extent(cameras: &[Camera]) -> f64 {
    let centres: Vec<Vec3> = cameras.iter().map(Camera::position).collect();
    let mean = scale(
        centres.iter().fold([0.0; 3], |acc, c| [acc[0] + c[0], acc[1] + c[1], acc[2] + c[2]]),
        1.0 / centres.len().max(1) as f64,
    );
    1.1 * centres.iter().map(|c| dot(sub(*c, mean), sub(*c, mean)).sqrt()).fold(0.0, f64::max)
}
