//! `loss.svg`: the training loss (every step, a line) and the validation loss (where
//! evaluated, points) against the step, from `metrics.jsonl`, drawn by the `plotters`
//! crate: steps as integers, the y range the data's, the legend in the upper right
//! corner, where falling losses leave room.

use std::path::Path;

use plotters::prelude::*;

use crate::outputs::write_atomic;
use sheaf_plugins::HostError;

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
    let all = || train.iter().chain(&val);
    let x_min = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max).max(x_min + 1.0);
    let y_min = all().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    // The data's range with a margin (a flat series gets one of its own).
    let pad = ((y_max - y_min) * 0.05).max(y_max.abs() * 1e-3).max(1e-6);
    let err = |e: String| HostError::encode("loss.svg", e);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x_min..x_max, (y_min - pad)..(y_max + pad))
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(train.iter().copied(), TRAIN_COLOUR.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label("training")
                .legend(|(x, y)| Rectangle::new([(x, y - 3), (x + 20, y + 3)], TRAIN_COLOUR.filled()));
        }
        if !val.is_empty() {
            chart
                .draw_series(val.iter().map(|&p| Circle::new(p, 4, VAL_COLOUR.filled())))
                .map_err(|e| err(e.to_string()))?
                .label("validation")
                .legend(|(x, y)| Circle::new((x + 10, y), 4, VAL_COLOUR.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
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
    /// The training loss one polyline in its colour, the validation loss a point per
    /// evaluation (and one in the legend); none for a series without points.
    #[test]
    fn training_a_line_and_validation_points() {
        let metrics = "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.5,\"val_loss\":1.7}\n{\"step\":3,\"loss\":1.2}\n{\"step\":4,\"loss\":1.0,\"val_loss\":1.3}\n";
        let svg = super::loss_svg(metrics).unwrap().unwrap();
        assert_eq!(count_in(&svg, "<polyline", "#1F77B4"), 1, "{svg}");
        assert_eq!(count_in(&svg, "<circle", "#FF7F0E"), 2 + 1, "{svg}");
        let svg = super::loss_svg("{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.0}\n").unwrap().unwrap();
        assert_eq!((count_in(&svg, "<polyline", "#1F77B4"), count_in(&svg, "<circle", "#FF7F0E")), (1, 0));
        assert!(super::loss_svg("").unwrap().is_none());
    }

    /// Steps are labelled as integers, and the y axis spans the data, not 0.
    #[test]
    fn axes_fit_the_data() {
        let metrics: String =
            (10..=60).map(|s| format!("{{\"step\":{s},\"loss\":{}}}\n", 3.0 - s as f64 / 100.0)).collect();
        let svg = super::loss_svg(&metrics).unwrap().unwrap();
        // Each label's text is the line after its `<text ...>`.
        let lines: Vec<&str> = svg.lines().collect();
        let labels: Vec<&str> =
            lines.windows(2).filter(|w| w[0].starts_with("<text")).map(|w| w[1].trim()).collect();
        assert!(labels.contains(&"50") && !labels.iter().any(|l| l.ends_with(".0")), "{labels:?}");
        let values: Vec<f64> = labels.iter().filter_map(|l| l.parse::<f64>().ok()).collect();
        assert!(values.iter().any(|&v| (2.3..=3.0).contains(&v) && v.fract() != 0.0), "{labels:?}");
        assert!(
            !labels.contains(&"0.0") && !labels.contains(&"0"),
            "the y axis starts at the data: {labels:?}"
        );
    }

    fn count_in(svg: &str, element: &str, c: &str) -> usize {
        svg.lines().filter(|l| l.contains(element) && l.contains(c)).count()
    }
}
