//! `loss.svg`: the training loss (every step) and the validation loss (where
//! evaluated) against the step, from `metrics.jsonl`, drawn by the `plotters` crate.

use std::path::Path;

use plotters::prelude::*;

use crate::outputs::write_atomic;
use crate::HostError;

/// The training series' colour (its polyline's stroke in the SVG).
pub const TRAIN_COLOUR: RGBColor = RGBColor(0x1F, 0x77, 0xB4);
/// The validation series' colour.
pub const VAL_COLOUR: RGBColor = RGBColor(0xFF, 0x7F, 0x0E);

/// A series' points: `(step, loss)`.
type Points = Vec<(f64, f64)>;

/// `(step, loss)` and `(step, val_loss)` of every whole line of `metrics.jsonl`.
fn series(metrics: &str) -> (Points, Points) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in metrics.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = v["step"].as_f64() else { continue };
        if let Some(l) = v["loss"].as_f64().filter(|l| l.is_finite()) {
            train.push((step, l));
        }
        if let Some(l) = v["val_loss"].as_f64().filter(|l| l.is_finite()) {
            val.push((step, l));
        }
    }
    (train, val)
}

/// The SVG of `metrics.jsonl`'s losses; `None` when it has no step.
pub fn loss_svg(metrics: &str) -> Result<Option<String>, HostError> {
    let (train, val) = series(metrics);
    if train.is_empty() && val.is_empty() {
        return Ok(None);
    }
    let all = train.iter().chain(&val);
    let (x_max, y_max) = all.fold((1.0f64, 0.0f64), |(x, y), &(s, l)| (x.max(s), y.max(l)));
    let err = |e: String| HostError::Output(format!("loss.svg: {e}"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_max, 0f64..(y_max * 1.05).max(1e-6))
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (points, colour, name) in [(&train, TRAIN_COLOUR, "training"), (&val, VAL_COLOUR, "validation")] {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 3), (x + 20, y + 3)], colour.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(Some(svg))
}

/// Writes `run_dir/loss.svg` from `run_dir/metrics.jsonl` (nothing when it has no step).
pub fn write_loss_svg(run_dir: &Path) -> Result<(), HostError> {
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    if let Some(svg) = loss_svg(&metrics)? {
        write_atomic(&run_dir.join("loss.svg"), svg.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// One polyline per series, in its colour; none for a series without points.
    #[test]
    fn one_polyline_per_series() {
        let metrics = "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.5,\"val_loss\":1.7}\n{\"step\":3,\"loss\":1.2}\n{\"step\":4,\"loss\":1.0,\"val_loss\":1.3}\n";
        let svg = super::loss_svg(metrics).unwrap().unwrap();
        assert_eq!((count_in(&svg, "#1F77B4"), count_in(&svg, "#FF7F0E")), (1, 1), "{svg}");
        let svg = super::loss_svg("{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.0}\n").unwrap().unwrap();
        assert_eq!((count_in(&svg, "#1F77B4"), count_in(&svg, "#FF7F0E")), (1, 0));
        assert!(super::loss_svg("").unwrap().is_none());
    }

    fn count_in(svg: &str, c: &str) -> usize {
        svg.lines().filter(|l| l.contains("<polyline") && l.contains(c)).count()
    }
}
