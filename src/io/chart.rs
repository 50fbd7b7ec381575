//! Line charts as images: the loss curve `learn` leaves next to an identity.
//!
//! Drawn by plotters into an RGB buffer (its bitmap backend, no image encoder of its own: the
//! PNG is written by [`write_png`](crate::io::write_png), atomically and with metadata); text in
//! the shipped `assets/DejaVuSans-ascii.ttf` (DejaVu Sans cut to ASCII), so that no system font
//! and no fontconfig are needed.

use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::io::RgbImage;
use crate::{Error, Result};

/// The font every chart writes in, registered with plotters once.
const FONT: &str = "stableid-sans";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans-ascii.ttf");

/// A chart of a loss along the steps of a run.
#[derive(Debug, Clone)]
pub struct LossCurve {
    /// (step, loss) pairs, steps increasing.
    pub points: Vec<(usize, f64)>,
    /// The line above the chart.
    pub title: String,
    pub width: u32,
    pub height: u32,
}

impl LossCurve {
    /// A 800 x 480 chart of `points` under `title`.
    pub fn new(points: Vec<(usize, f64)>, title: impl Into<String>) -> Self {
        Self { points, title: title.into(), width: 800, height: 480 }
    }

    /// The width of the running mean drawn over the losses: a twentieth of the steps, at least 1.
    pub fn window(&self) -> usize {
        (self.points.len() / 20).max(1)
    }

    /// The mean of the `window` losses up to and including each step (fewer at the start).
    pub fn running_mean(&self) -> Vec<(usize, f64)> {
        let window = self.window();
        let mut sum = 0.0;
        self.points
            .iter()
            .enumerate()
            .map(|(i, &(step, loss))| {
                sum += loss;
                if i >= window {
                    sum -= self.points[i - window].1;
                }
                (step, sum / (i + 1).min(window) as f64)
            })
            .collect()
    }

    /// Draws the chart: each step's loss as a thin light line, their running mean
    /// ([`LossCurve::running_mean`]) as a dark one, on axes labelled with steps and losses.
    pub fn draw(&self) -> Result<RgbImage> {
        let finite: Vec<(usize, f64)> = self.points.iter().copied().filter(|(_, l)| l.is_finite()).collect();
        let (Some(first), Some(last)) = (finite.first(), finite.last()) else {
            return Err(Error::Input("a loss curve needs at least one finite loss".into()));
        };
        static REGISTERED: OnceLock<bool> = OnceLock::new();
        if !*REGISTERED.get_or_init(|| register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()) {
            return Err(Error::Internal("the shipped chart font does not load".into()));
        }
        let (low, high) =
            finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, l)| (lo.min(l), hi.max(l)));
        let margin = ((high - low) * 0.05).max(1e-6);
        let steps = first.0..last.0.max(first.0 + 1);
        let mut pixels = vec![0u8; self.width as usize * self.height as usize * 3];
        let drawn = (|| -> std::result::Result<(), Box<dyn std::error::Error>> {
            let root = BitMapBackend::with_buffer(&mut pixels, (self.width, self.height)).into_drawing_area();
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(&self.title, (FONT, 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(steps, (low - margin)..(high + margin))?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc("loss")
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 15))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()?;
            chart.draw_series(LineSeries::new(finite.iter().copied(), RGBColor(160, 190, 230)))?;
            let mean = LossCurve { points: finite.clone(), ..self.clone() }.running_mean();
            chart.draw_series(LineSeries::new(mean, RGBColor(20, 60, 160).stroke_width(2)))?;
            root.present()?;
            Ok(())
        })();
        drawn.map_err(|e| Error::Internal(format!("drawing the loss curve: {e}")))?;
        Ok(RgbImage { width: self.width, height: self.height, pixels })
    }
}
