//! Plots for the run report: the loss curve and the before/after metrics, as SVG files (text is
//! SVG text, so no font files are needed on the machine).

use std::path::Path;

use plotters::prelude::*;

use super::Metrics;

fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Training loss per step (and validation loss per epoch, placed at each epoch's last step).
pub fn loss_plot(
    path: &Path,
    step_losses: &[f32],
    eval_losses: &[f64],
    steps_per_epoch: usize,
) -> std::io::Result<()> {
    let root = SVGBackend::new(path, (720, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = step_losses.len().max(1);
    let top = step_losses
        .iter()
        .map(|l| *l as f64)
        .chain(eval_losses.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(1f64..n as f64, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            step_losses
                .iter()
                .enumerate()
                .map(|(i, l)| ((i + 1) as f64, *l as f64)),
            &BLUE,
        ))
        .map_err(err)?
        .label("train (per step)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE));
    if !eval_losses.is_empty() {
        chart
            .draw_series(LineSeries::new(
                eval_losses
                    .iter()
                    .enumerate()
                    .map(|(e, l)| (((e + 1) * steps_per_epoch.max(1)) as f64, *l)),
                RED.stroke_width(2),
            ))
            .map_err(err)?
            .label("eval (per epoch)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// The nine metrics before and after, side by side.
pub fn metrics_plot(path: &Path, before: &Metrics, after: &Metrics) -> std::io::Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (b, a) = (before.values(), after.values());
    let top = b.iter().chain(a.iter()).copied().fold(1.0f64, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "retrieval metrics: before (grey) and after (blue)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(44)
        .build_cartesian_2d(-0.5f64..8.5f64, 0f64..top)
        .map_err(err)?;
    // Short names so that all nine fit under their bars.
    const SHORT: [&str; 9] = [
        "AP", "DCG", "F1", "hit", "nDCG", "P", "R-prec", "recall", "RR",
    ];
    chart
        .configure_mesh()
        .x_labels(9)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && (0.0..9.0).contains(&i) {
                SHORT[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .x_desc("@k metrics at k = the evaluation limit")
        .disable_x_mesh()
        .draw()
        .map_err(err)?;
    for (i, (vb, va)) in b.iter().zip(a.iter()).enumerate() {
        let x = i as f64;
        chart
            .draw_series([
                Rectangle::new(
                    [(x - 0.38, 0.0), (x - 0.02, *vb)],
                    RGBColor(150, 150, 150).filled(),
                ),
                Rectangle::new([(x + 0.02, 0.0), (x + 0.38, *va)], BLUE.filled()),
            ])
            .map_err(err)?;
    }
    root.present().map_err(err)
}
