//! controlnet_aux's `Body.__call__` (`open_pose/body.py`) around the network: the input it
//! builds, the maps it upsamples, the peaks it finds and how it groups them into people. Every
//! step keeps the reference's arithmetic (OpenCV resizes, scipy's f64 Gaussian filter, NumPy's
//! `linspace` and banker's rounding, Python's sequential sums) so that the same network outputs
//! give the same people.
//!
//! One deviation: where a limb connects to more than two people found so far, controlnet_aux
//! fails (an index error); here the first two are used.

use image::RgbImage;
use rayon::prelude::*;

use super::opencv::{resize_f32, resize_u8, Image, Interpolation};
use crate::models::openpose::{HEATMAP_CHANNELS, PAF_CHANNELS, STRIDE};

/// `boxsize * scale_search[0]`: the height the photo is scaled to for the network.
const NETWORK_HEIGHT: f64 = 0.5 * 368.0;
/// The value the input is padded with, to a multiple of [`STRIDE`].
const PAD_VALUE: u8 = 128;
/// Peak threshold on the smoothed heat maps (`thre1`).
const PEAK_THRESHOLD: f64 = 0.1;
/// Threshold of a PAF sample along a limb (`thre2`).
const PAF_THRESHOLD: f64 = 0.05;
/// Samples along a candidate limb (`mid_num`).
const LIMB_SAMPLES: usize = 10;
/// Keypoints per person.
pub const KEYPOINTS: usize = 18;

/// The 19 limbs searched (`limbSeq`, from 0): the 17 drawn and two ear-to-shoulder links.
pub(super) const LIMBS: [[usize; 2]; 19] = [
    [1, 2],
    [1, 5],
    [2, 3],
    [3, 4],
    [5, 6],
    [6, 7],
    [1, 8],
    [8, 9],
    [9, 10],
    [1, 11],
    [11, 12],
    [12, 13],
    [1, 0],
    [0, 14],
    [14, 16],
    [0, 15],
    [15, 17],
    [2, 16],
    [5, 17],
];
/// The (x, y) PAF channels of each limb (`mapIdx` minus 19).
const LIMB_PAF: [[usize; 2]; 19] = [
    [12, 13],
    [20, 21],
    [14, 15],
    [16, 17],
    [22, 23],
    [24, 25],
    [0, 1],
    [2, 3],
    [4, 5],
    [6, 7],
    [8, 9],
    [10, 11],
    [28, 29],
    [30, 31],
    [34, 35],
    [32, 33],
    [36, 37],
    [18, 19],
    [26, 27],
];

/// The network's input made from a photo, and the sizes to undo it.
#[derive(Debug, Clone)]
pub struct NetworkInput {
    /// (3, height, width) values `pixel / 256 - 0.5` in BGR order, padded with 128 at the
    /// bottom and right to multiples of 8.
    pub pixels: Vec<f32>,
    pub width: usize,
    pub height: usize,
    /// The photo scaled for the network, before padding.
    pub scaled: (usize, usize),
    /// The photo the keypoints are found in.
    pub photo: (usize, usize),
}

/// `util.smart_resize_k` / `smart_resize`'s choice: shrinking (by the mean of both sides) is
/// `INTER_AREA`, anything else `INTER_LANCZOS4`.
fn smart_interpolation(from: (usize, usize), to: (f64, f64)) -> Interpolation {
    if (to.0 + to.1) / ((from.0 + from.1) as f64) < 1.0 {
        Interpolation::Area
    } else {
        Interpolation::Lanczos4
    }
}

/// The photo scaled to 184 rows (`smart_resize_k` by `0.5 * 368 / height`), padded, normalised.
pub fn network_input(photo: &RgbImage) -> NetworkInput {
    let (w, h) = (photo.width() as usize, photo.height() as usize);
    let scale = NETWORK_HEIGHT / h as f64;
    let target = (w as f64 * scale, h as f64 * scale);
    let image = Image { width: w, height: h, channels: 3, data: photo.as_raw().clone() };
    let scaled = resize_u8(&image, target.0 as usize, target.1 as usize, smart_interpolation((w, h), target));
    let (width, height) = (scaled.width.next_multiple_of(STRIDE), scaled.height.next_multiple_of(STRIDE));
    let mut pixels = vec![f32::from(PAD_VALUE) / 256.0 - 0.5; 3 * width * height];
    for y in 0..scaled.height {
        for x in 0..scaled.width {
            for (plane, rgb_channel) in [2, 1, 0].into_iter().enumerate() {
                let v = scaled.data[(y * scaled.width + x) * 3 + rgb_channel];
                pixels[(plane * height + y) * width + x] = f32::from(v) / 256.0 - 0.5;
            }
        }
    }
    NetworkInput { pixels, width, height, scaled: (scaled.width, scaled.height), photo: (w, h) }
}

/// The heat maps of the 18 keypoints and the 38 PAF channels at the photo's size (row-major,
/// `photo.0 * photo.1` values each).
#[derive(Debug, Clone)]
pub struct BodyMaps {
    pub width: usize,
    pub height: usize,
    pub heatmaps: Vec<Vec<f32>>,
    pub pafs: Vec<Vec<f32>>,
}

/// Upsamples the network's outputs as `Body.__call__` does, channel by channel: x8 (Lanczos),
/// cut the padding, resize to the photo. `paf` is (38, h, w) and `heat` (19, h, w), row-major,
/// with `h = input.height / 8`, `w = input.width / 8`. The background heat map is not needed.
pub fn upsample(input: &NetworkInput, paf: &[f32], heat: &[f32]) -> BodyMaps {
    let (h, w) = (input.height / STRIDE, input.width / STRIDE);
    assert_eq!((paf.len(), heat.len()), (PAF_CHANNELS * h * w, HEATMAP_CHANNELS * h * w), "map sizes");
    let (photo_w, photo_h) = input.photo;
    let one = |channel: &[f32]| -> Vec<f32> {
        let map = Image { width: w, height: h, channels: 1, data: channel.to_vec() };
        let up = resize_f32(&map, w * STRIDE, h * STRIDE, Interpolation::Lanczos4);
        let (sw, sh) = input.scaled;
        let cropped: Vec<f32> = (0..sh).flat_map(|y| up.data[y * up.width..][..sw].iter().copied()).collect();
        let cropped = Image { width: sw, height: sh, channels: 1, data: cropped };
        let interpolation = smart_interpolation((sh, sw), (photo_h as f64, photo_w as f64));
        resize_f32(&cropped, photo_w, photo_h, interpolation).data
    };
    let heatmaps = heat.par_chunks(h * w).take(KEYPOINTS).map(one).collect();
    let pafs = paf.par_chunks(h * w).map(one).collect();
    BodyMaps { width: photo_w, height: photo_h, heatmaps, pafs }
}

/// A peak of a heat map: a keypoint candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    pub x: usize,
    pub y: usize,
    /// The (unsmoothed) heat map's value there.
    pub score: f64,
    /// Its index among all peaks (of all keypoints, in keypoint order).
    pub id: usize,
}

/// One person (a row of controlnet_aux's `subset`).
#[derive(Debug, Clone, PartialEq)]
pub struct PersonParts {
    /// The peak id of each keypoint, `None` where missing.
    pub parts: [Option<usize>; KEYPOINTS],
    /// Sum of the peaks' scores and the limbs' scores.
    pub score: f64,
    /// Number of keypoints.
    pub count: f64,
}

/// Everything `Body.__call__` returns: the peaks (`candidate`) and the people (`subset`).
#[derive(Debug, Clone, PartialEq)]
pub struct BodyDetection {
    pub peaks: Vec<Peak>,
    pub people: Vec<PersonParts>,
}

/// scipy's `gaussian_filter(map, sigma=3)` (truncate 4: 25 taps, mode `reflect`), in f64, rows
/// first, with scipy's symmetric-kernel sum order.
fn gaussian_filter(map: &[f64], width: usize, height: usize) -> Vec<f64> {
    const RADIUS: usize = 12;
    let weights: Vec<f64> = (-(RADIUS as i64)..=RADIUS as i64).map(|x| (-0.5 / 9.0 * (x * x) as f64).exp()).collect();
    let total = numpy_sum(&weights);
    let weights: Vec<f64> = weights.iter().map(|w| w / total).collect();
    let reflect = |i: i64, n: usize| -> usize {
        let period = 2 * n as i64;
        let i = i.rem_euclid(period);
        if i < n as i64 {
            i as usize
        } else {
            (period - 1 - i) as usize
        }
    };
    let filter_line = |line: &[f64]| -> Vec<f64> {
        let n = line.len();
        (0..n)
            .map(|c| {
                let mut sum = line[c] * weights[RADIUS];
                for j in (1..=RADIUS as i64).rev() {
                    let pair = line[reflect(c as i64 - j, n)] + line[reflect(c as i64 + j, n)];
                    sum += pair * weights[RADIUS - j as usize];
                }
                sum
            })
            .collect()
    };
    let mut out = map.to_vec();
    for x in 0..width {
        let column: Vec<f64> = (0..height).map(|y| out[y * width + x]).collect();
        for (y, v) in filter_line(&column).into_iter().enumerate() {
            out[y * width + x] = v;
        }
    }
    for row in out.chunks_mut(width) {
        let filtered = filter_line(row);
        row.copy_from_slice(&filtered);
    }
    out
}

/// NumPy's pairwise `sum` of fewer than 128 values: eight interleaved partial sums, combined as
/// `((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))`, then the remainder one by one.
fn numpy_sum(values: &[f64]) -> f64 {
    if values.len() < 8 {
        return values.iter().sum();
    }
    let mut r = [0f64; 8];
    r.copy_from_slice(&values[..8]);
    let blocks = values.len() / 8 * 8;
    for chunk in values[8..blocks].chunks(8) {
        for (a, b) in r.iter_mut().zip(chunk) {
            *a += b;
        }
    }
    let mut sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for v in &values[blocks..] {
        sum += v;
    }
    sum
}

/// The peaks of each keypoint's heat map: after smoothing, at least each of the four neighbours
/// (zero outside the map) and above 0.1; in row-major order.
fn find_peaks(maps: &BodyMaps) -> Vec<Vec<Peak>> {
    let (w, h) = (maps.width, maps.height);
    let smoothed: Vec<Vec<f64>> = maps
        .heatmaps
        .par_iter()
        .map(|m| gaussian_filter(&m.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), w, h))
        .collect();
    let mut next_id = 0;
    let mut all = Vec::with_capacity(KEYPOINTS);
    for (map, smooth) in maps.heatmaps.iter().zip(&smoothed) {
        let at = |x: i64, y: i64| {
            if (0..w as i64).contains(&x) && (0..h as i64).contains(&y) {
                smooth[y as usize * w + x as usize]
            } else {
                0.0
            }
        };
        let mut peaks = Vec::new();
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let v = at(x, y);
                if v >= at(x, y - 1)
                    && v >= at(x, y + 1)
                    && v >= at(x - 1, y)
                    && v >= at(x + 1, y)
                    && v > PEAK_THRESHOLD
                {
                    let score = f64::from(map[y as usize * w + x as usize]);
                    peaks.push(Peak { x: x as usize, y: y as usize, score, id: next_id });
                    next_id += 1;
                }
            }
        }
        all.push(peaks);
    }
    all
}

/// A limb kept between two peaks: their ids, its score, their indices among their keypoint's
/// peaks.
#[derive(Debug, Clone, Copy)]
struct Connection {
    a: usize,
    b: usize,
    score: f64,
}

/// `np.linspace(start, stop, 10)[k]`: `k * step + start`, the last one exactly `stop`.
fn linspace(start: f64, stop: f64, k: usize) -> f64 {
    if k == LIMB_SAMPLES - 1 {
        stop
    } else {
        k as f64 * ((stop - start) / (LIMB_SAMPLES - 1) as f64) + start
    }
}

/// The limbs of one kind: every pair of peaks scored by the PAF along the segment between them;
/// pairs whose samples mostly agree with the segment's direction are kept greedily by score,
/// each peak in at most one limb.
fn connect(a_peaks: &[Peak], b_peaks: &[Peak], paf: [&[f32]; 2], maps: &BodyMaps) -> Vec<Connection> {
    let w = maps.width;
    let mut found: Vec<(usize, usize, f64)> = Vec::new();
    for (i, a) in a_peaks.iter().enumerate() {
        for (j, b) in b_peaks.iter().enumerate() {
            let (vx, vy) = (b.x as i64 - a.x as i64, b.y as i64 - a.y as i64);
            let norm = ((vx * vx + vy * vy) as f64).sqrt().max(0.001);
            let (ux, uy) = (vx as f64 / norm, vy as f64 / norm);
            let mut samples = [0f64; LIMB_SAMPLES];
            for (k, s) in samples.iter_mut().enumerate() {
                let x = linspace(a.x as f64, b.x as f64, k).round_ties_even() as usize;
                let y = linspace(a.y as f64, b.y as f64, k).round_ties_even() as usize;
                *s = f64::from(paf[0][y * w + x]) * ux + f64::from(paf[1][y * w + x]) * uy;
            }
            let mean = samples.iter().fold(0.0, |sum, s| sum + s) / LIMB_SAMPLES as f64;
            let score = mean + (0.5 * maps.height as f64 / norm - 1.0).min(0.0);
            let agreeing = samples.iter().filter(|&&s| s > PAF_THRESHOLD).count();
            if agreeing as f64 > 0.8 * LIMB_SAMPLES as f64 && score > 0.0 {
                found.push((i, j, score));
            }
        }
    }
    // A stable sort by decreasing score, as Python's sorted(..., reverse=True).
    found.sort_by(|x, y| y.2.total_cmp(&x.2));
    let mut kept: Vec<(usize, usize, Connection)> = Vec::new();
    for (i, j, score) in found {
        if kept.iter().all(|&(ki, kj, _)| ki != i && kj != j) {
            kept.push((i, j, Connection { a: a_peaks[i].id, b: b_peaks[j].id, score }));
            if kept.len() >= a_peaks.len().min(b_peaks.len()) {
                break;
            }
        }
    }
    kept.into_iter().map(|(_, _, c)| c).collect()
}

/// Peaks, limbs and people from the upsampled maps, as `Body.__call__` finds them: people are
/// grown limb by limb, merged when a limb joins two disjoint ones, and dropped with fewer than 4
/// keypoints or a mean score under 0.4.
pub fn find_people(maps: &BodyMaps) -> BodyDetection {
    let peaks_by_part = find_peaks(maps);
    let peaks: Vec<Peak> = peaks_by_part.iter().flatten().copied().collect();
    let mut people: Vec<PersonParts> = Vec::new();
    for (k, (&[part_a, part_b], &[paf_x, paf_y])) in LIMBS.iter().zip(&LIMB_PAF).enumerate() {
        let (a_peaks, b_peaks) = (&peaks_by_part[part_a], &peaks_by_part[part_b]);
        if a_peaks.is_empty() || b_peaks.is_empty() {
            continue;
        }
        for c in connect(a_peaks, b_peaks, [&maps.pafs[paf_x], &maps.pafs[paf_y]], maps) {
            let matching: Vec<usize> = (0..people.len())
                .filter(|&p| people[p].parts[part_a] == Some(c.a) || people[p].parts[part_b] == Some(c.b))
                .take(2)
                .collect();
            match matching[..] {
                [p] => add_part(&mut people[p], part_b, c, &peaks),
                [p1, p2] => {
                    let shared = (0..KEYPOINTS).any(|i| people[p1].parts[i].is_some() && people[p2].parts[i].is_some());
                    if shared {
                        let person = &mut people[p1];
                        person.parts[part_b] = Some(c.b);
                        person.count += 1.0;
                        person.score += peaks[c.b].score + c.score;
                    } else {
                        let other = people.remove(p2);
                        let person = &mut people[p1];
                        for (mine, theirs) in person.parts.iter_mut().zip(other.parts) {
                            *mine = mine.or(theirs);
                        }
                        person.score += other.score;
                        person.count += other.count;
                        person.score += c.score;
                    }
                }
                // The two ear-to-shoulder limbs only join people found already.
                _ if k < 17 => {
                    let mut parts = [None; KEYPOINTS];
                    parts[part_a] = Some(c.a);
                    parts[part_b] = Some(c.b);
                    let score = (peaks[c.a].score + peaks[c.b].score) + c.score;
                    people.push(PersonParts { parts, score, count: 2.0 });
                }
                _ => {}
            }
        }
    }
    people.retain(|p| !(p.count < 4.0 || p.score / p.count < 0.4));
    BodyDetection { peaks, people }
}

/// The `found == 1` case: the limb's second peak joins the person, unless it is there already.
fn add_part(person: &mut PersonParts, part: usize, c: Connection, peaks: &[Peak]) {
    if person.parts[part] != Some(c.b) {
        person.parts[part] = Some(c.b);
        person.count += 1.0;
        person.score += peaks[c.b].score + c.score;
    }
}
