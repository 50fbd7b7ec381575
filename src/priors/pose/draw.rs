//! controlnet_aux's `draw_bodypose` (`open_pose/util.py`), with OpenCV 5's rasterisation of the
//! three calls it makes (`modules/imgproc/src/drawing.cpp`), so that the pose map is the same
//! pixels: each limb is the polygon `cv2.ellipse2Poly(centre, (length / 2, 4), angle, 0, 360, 1)`
//! filled by `cv2.fillConvexPoly` at 0.6 of its colour, then each keypoint a filled
//! `cv2.circle` of radius 4 (8-connected, no antialiasing, no sub-pixel shift).

use image::{Rgb, RgbImage};

use super::body::LIMBS;

/// Limbs drawn: the first 17 of those searched (the two ear-to-shoulder links are not drawn).
const DRAWN_LIMBS: usize = 17;

/// Limb `i` and keypoint `i` are drawn in colour `i` (as written into the RGB image).
pub const COLORS: [[u8; 3]; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

/// Half the width of a limb's ellipse, in pixels (`stickwidth`).
const STICK_WIDTH: i64 = 4;
/// Radius of a keypoint's disc.
const JOINT_RADIUS: i64 = 4;

/// Draws one person's 18 keypoints (`[x, y]` as fractions of the width and height, `None` where
/// missing) onto `canvas`, as `draw_bodypose(canvas, keypoints)`.
pub fn draw_bodypose(canvas: &mut RgbImage, keypoints: &[Option<[f64; 2]>; 18]) {
    let (w, h) = (f64::from(canvas.width()), f64::from(canvas.height()));
    for (limb, color) in LIMBS[..DRAWN_LIMBS].iter().zip(COLORS) {
        let (Some(a), Some(b)) = (keypoints[limb[0]], keypoints[limb[1]]) else { continue };
        // controlnet_aux's names: X holds the rows, Y the columns.
        let (y0, y1) = (a[0] * w, b[0] * w);
        let (x0, x1) = (a[1] * h, b[1] * h);
        let (mean_x, mean_y) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
        let length = ((x0 - x1).powi(2) + (y0 - y1).powi(2)).powf(0.5);
        // math.degrees is x * (180 / pi) with the quotient rounded, not Rust's to_degrees constant.
        let angle = (x0 - x1).atan2(y0 - y1) * (180.0 / std::f64::consts::PI);
        let polygon = ellipse_polygon(
            [mean_y.trunc() as i64, mean_x.trunc() as i64],
            [(length / 2.0).trunc() as i64, STICK_WIDTH],
            angle.trunc() as i64,
        );
        // int(float(c) * 0.6): 255 -> 153, 170 -> 102, 85 -> 51.
        let dim = color.map(|c| (f64::from(c) * 0.6).trunc() as u8);
        fill_convex_polygon(canvas, &polygon, Rgb(dim));
    }
    for (keypoint, color) in keypoints.iter().zip(COLORS) {
        if let Some([x, y]) = keypoint {
            fill_circle(canvas, [(x * w).trunc() as i64, (y * h).trunc() as i64], JOINT_RADIUS, Rgb(color));
        }
    }
}

/// OpenCV's `SinTable`: sin of 0..=450 degrees, rounded to 7 decimals, as f32.
fn sin_table(degrees: i64) -> f32 {
    let sin = (degrees as f64).to_radians().sin();
    ((sin * 1e7).round() / 1e7) as f32
}

/// `cv2.ellipse2Poly(centre, axes, angle, 0, 360, 1)`: a point per degree, computed in f64 from
/// the f32 table, rounded to the nearest pixel (ties to even), consecutive duplicates removed.
fn ellipse_polygon(center: [i64; 2], axes: [i64; 2], angle: i64) -> Vec<[i64; 2]> {
    let angle = angle.rem_euclid(360);
    let (alpha, beta) = (f64::from(sin_table(450 - angle)), f64::from(sin_table(angle)));
    let mut points: Vec<[i64; 2]> = Vec::new();
    for degree in 0..=360 {
        let x = axes[0] as f64 * f64::from(sin_table(450 - degree));
        let y = axes[1] as f64 * f64::from(sin_table(degree));
        let px = center[0] as f64 + x * alpha - y * beta;
        let py = center[1] as f64 + x * beta + y * alpha;
        let point = [px.round_ties_even() as i64, py.round_ties_even() as i64];
        if points.last() != Some(&point) {
            points.push(point);
        }
    }
    if points.len() == 1 {
        points = vec![center, center];
    }
    points
}

/// Fixed-point bits of OpenCV's polygon edges (`XY_SHIFT`).
const XY_SHIFT: u32 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;

fn hline(canvas: &mut RgbImage, y: i64, x1: i64, x2: i64, color: Rgb<u8>) {
    for x in x1..=x2 {
        canvas.put_pixel(x as u32, y as u32, color);
    }
}

/// `FillConvexPoly` with 8-connected edges and no shift: the outline is drawn with Bresenham
/// lines, then each row between the two edges walked down from the top vertex is filled; edge
/// x positions are 16.16 fixed point, rounded half up at both ends of a row.
fn fill_convex_polygon(canvas: &mut RgbImage, v: &[[i64; 2]], color: Rgb<u8>) {
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    let n = v.len();
    let mut top = 0;
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0][0], v[0][0], v[0][1], v[0][1]);
    let mut previous = v[n - 1];
    for (i, &p) in v.iter().enumerate() {
        if p[1] < ymin {
            ymin = p[1];
            top = i;
        }
        ymax = ymax.max(p[1]);
        xmax = xmax.max(p[0]);
        xmin = xmin.min(p[0]);
        line(canvas, previous, p, color);
        previous = p;
    }
    if n < 3 || xmax < 0 || ymax < 0 || xmin >= width || ymin >= height {
        return;
    }
    let ymax = ymax.min(height - 1);

    /// One side of the polygon: the vertex it left from, its direction through the vertices, its
    /// x and slope, and the row where it ends.
    #[derive(Clone, Copy)]
    struct Edge {
        idx: usize,
        step: usize,
        x: i64,
        dx: i64,
        end_y: i64,
    }
    let mut edges = [
        Edge { idx: top, step: 1, x: -XY_ONE, dx: 0, end_y: ymin },
        Edge { idx: top, step: n - 1, x: -XY_ONE, dx: 0, end_y: ymin },
    ];
    let mut remaining = n as i64;
    let mut y = ymin;
    loop {
        for edge in &mut edges {
            if y < edge.end_y {
                continue;
            }
            let mut from = edge.idx;
            let mut to = (from + edge.step) % n;
            loop {
                remaining -= 1;
                if remaining < 0 {
                    break;
                }
                let to_y = v[to][1];
                if to_y > y {
                    let (xs, xe) = (v[from][0] << XY_SHIFT, v[to][0] << XY_SHIFT);
                    // C's division truncates toward zero, as Rust's does.
                    edge.dx = ((xe - xs) * 2 + (to_y - y)) / (2 * (to_y - y));
                    edge.end_y = to_y;
                    edge.x = xs;
                    edge.idx = to;
                    break;
                }
                from = to;
                to = (to + edge.step) % n;
            }
        }
        if remaining < 0 {
            break;
        }
        if y >= 0 {
            let (left, right) = if edges[0].x > edges[1].x { (1, 0) } else { (0, 1) };
            let x1 = (edges[left].x + (XY_ONE >> 1)) >> XY_SHIFT;
            let x2 = (edges[right].x + (XY_ONE >> 1)) >> XY_SHIFT;
            if x2 >= 0 && x1 < width {
                hline(canvas, y, x1.max(0), x2.min(width - 1), color);
            }
        }
        edges[0].x += edges[0].dx;
        edges[1].x += edges[1].dx;
        y += 1;
        if y > ymax {
            break;
        }
    }
}

/// `clipLine`: clips the segment to the image in integer arithmetic (Cohen-Sutherland, with C's
/// truncating divisions); `None` when it misses the image.
fn clip_line(width: i64, height: i64, mut a: [i64; 2], mut b: [i64; 2]) -> Option<([i64; 2], [i64; 2])> {
    let (right, bottom) = (width - 1, height - 1);
    let code = |p: [i64; 2]| {
        i64::from(p[0] < 0) + i64::from(p[0] > right) * 2 + i64::from(p[1] < 0) * 4 + i64::from(p[1] > bottom) * 8
    };
    let (mut c1, mut c2) = (code(a), code(b));
    if (c1 & c2) == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let edge = if c1 < 8 { 0 } else { bottom };
            a[0] += (edge - a[1]) * (b[0] - a[0]) / (b[1] - a[1]);
            a[1] = edge;
            c1 = i64::from(a[0] < 0) + i64::from(a[0] > right) * 2;
        }
        if c2 & 12 != 0 {
            let edge = if c2 < 8 { 0 } else { bottom };
            b[0] += (edge - b[1]) * (b[0] - a[0]) / (b[1] - a[1]);
            b[1] = edge;
            c2 = i64::from(b[0] < 0) + i64::from(b[0] > right) * 2;
        }
        if (c1 & c2) == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let edge = if c1 == 1 { 0 } else { right };
                a[1] += (edge - a[0]) * (b[1] - a[1]) / (b[0] - a[0]);
                a[0] = edge;
                c1 = 0;
            }
            if c2 != 0 {
                let edge = if c2 == 1 { 0 } else { right };
                b[1] += (edge - b[0]) * (b[1] - a[1]) / (b[0] - a[0]);
                b[0] = edge;
                c2 = 0;
            }
        }
    }
    ((c1 | c2) == 0).then_some((a, b))
}

/// OpenCV's 8-connected `Line` (its `LineIterator`, left to right): Bresenham along the major
/// axis, stepping the minor axis while the error is negative.
fn line(canvas: &mut RgbImage, a: [i64; 2], b: [i64; 2], color: Rgb<u8>) {
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    let inside = |p: [i64; 2]| (0..width).contains(&p[0]) && (0..height).contains(&p[1]);
    let (mut a, mut b) = (a, b);
    if !inside(a) || !inside(b) {
        match clip_line(width, height, a, b) {
            Some(clipped) => (a, b) = clipped,
            None => return,
        }
    }
    if b[0] < a[0] {
        std::mem::swap(&mut a, &mut b);
    }
    let (mut dx, mut dy) = (b[0] - a[0], b[1] - a[1]);
    let mut step_y = 1;
    if dy < 0 {
        dy = -dy;
        step_y = -1;
    }
    // Along the major axis every step; along the minor one when the error is negative.
    let vertical = dy > dx;
    if vertical {
        std::mem::swap(&mut dx, &mut dy);
    }
    let (mut err, plus, minus) = (dx - 2 * dy, 2 * dx, -2 * dy);
    let mut p = a;
    for _ in 0..=dx {
        canvas.put_pixel(p[0] as u32, p[1] as u32, color);
        let minor = err < 0;
        err += minus + if minor { plus } else { 0 };
        if vertical {
            p[1] += step_y;
            if minor {
                p[0] += 1;
            }
        } else {
            p[0] += 1;
            if minor {
                p[1] += step_y;
            }
        }
    }
}

/// OpenCV's `Circle` with `fill`: the midpoint circle, each of its rows filled.
fn fill_circle(canvas: &mut RgbImage, center: [i64; 2], radius: i64, color: Rgb<u8>) {
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    let (mut err, mut dx, mut dy, mut plus, mut minus) = (0i64, radius, 0i64, 1i64, 2 * radius - 1);
    let mut row = |y: i64, x1: i64, x2: i64| {
        if (0..height).contains(&y) && x2 >= 0 && x1 < width {
            hline(canvas, y, x1.max(0), x2.min(width - 1), color);
        }
    };
    while dx >= dy {
        let (y11, y12, y21, y22) = (center[1] - dy, center[1] + dy, center[1] - dx, center[1] + dx);
        let (x11, x12, x21, x22) = (center[0] - dx, center[0] + dx, center[0] - dy, center[0] + dy);
        // OpenCV skips a ring whose rows all miss the image (the same pixels as clipping each).
        if x11 < width && x12 >= 0 && y21 < height && y22 >= 0 {
            row(y11, x11, x12);
            row(y12, x11, x12);
            if x21 < width && x22 >= 0 {
                row(y21, x21, x22);
                row(y22, x21, x22);
            }
        }
        dy += 1;
        err += plus;
        plus += 2;
        if err > 0 {
            err -= minus;
            dx -= 1;
            minus -= 2;
        }
    }
}
