//! The side-by-side table and the SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use writebehind::WriteMode;

use crate::probe::BUCKET;
use crate::{group, ModeResult};

/// `write-through` / `write-behind`.
pub fn mode_name(mode: WriteMode) -> &'static str {
    match mode {
        WriteMode::Through => "write-through",
        WriteMode::Behind => "write-behind",
        _ => "read-only",
    }
}

/// `nproc` and the CPU model, from the OS.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    format!("{cpus} CPUs, {model}")
}

/// Nanoseconds as a short human duration.
pub fn dur(ns: u64) -> String {
    let ns = ns as f64;
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.1} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

fn quantiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "-".to_string();
    }
    format!(
        "{} / {} / {}",
        dur(h.value_at_quantile(0.5)),
        dur(h.value_at_quantile(0.99)),
        dur(h.value_at_quantile(0.999))
    )
}

/// A labelled row of the table: one cell per mode.
type Row = (&'static str, Vec<String>);

/// The cells of one row: `f` of each mode's result.
fn cells(results: &[ModeResult], f: impl Fn(&ModeResult) -> String) -> Vec<String> {
    results.iter().map(f).collect()
}

/// The side-by-side table, after a header of settings.
pub fn table(header: String, results: &[ModeResult]) -> String {
    let mut rows: Vec<Row> = vec![("", cells(results, |r| mode_name(r.mode).to_string()))];
    rows.extend(client_rows(results));
    rows.extend(database_rows(results));
    rows.extend(flusher_rows(results));
    let mut out = header;
    out.push('\n');
    out.push_str(&render(&rows, results.len()));
    out.push_str(&notes(results));
    out
}

/// What the clients saw: throughput and latencies.
fn client_rows(results: &[ModeResult]) -> Vec<Row> {
    vec![
        (
            "throughput (ops/s)",
            cells(results, |r| {
                group((r.reads.len() + r.writes.len()) as f64 / r.seconds)
            }),
        ),
        (
            "  reads / updates",
            cells(results, |r| {
                format!(
                    "{} / {}",
                    group(r.reads.len() as f64),
                    group(r.writes.len() as f64)
                )
            }),
        ),
        (
            "read latency p50/p99/p99.9",
            cells(results, |r| quantiles(&r.reads)),
        ),
        (
            "write latency p50/p99/p99.9",
            cells(results, |r| quantiles(&r.writes)),
        ),
    ]
}

/// What the database saw: transactions, rows, and how long writes waited for it.
fn database_rows(results: &[ModeResult]) -> Vec<Row> {
    vec![
        (
            "DB transactions",
            cells(results, |r| {
                if r.failed_transactions == 0 {
                    group(r.transactions as f64)
                } else {
                    format!(
                        "{} (+{} failed)",
                        group(r.transactions as f64),
                        group(r.failed_transactions as f64)
                    )
                }
            }),
        ),
        ("DB rows written", cells(results, |r| group(r.rows as f64))),
        (
            "rows per transaction",
            cells(results, |r| {
                format!("{:.1}", r.rows as f64 / r.transactions.max(1) as f64)
            }),
        ),
        (
            "conflation (updates/row)",
            cells(results, |r| {
                format!("{:.2}", r.writes.len() as f64 / r.rows.max(1) as f64)
            }),
        ),
        (
            "oldest unflushed write",
            cells(results, |r| {
                if r.ages.is_empty() {
                    "-".to_string()
                } else {
                    format!(
                        "{} (p99 {})",
                        dur(r.ages.max()),
                        dur(r.ages.value_at_quantile(0.99))
                    )
                }
            }),
        ),
    ]
}

/// The flusher's handoffs and takeovers (only where there were any), the final flush and
/// the consistency check.
fn flusher_rows(results: &[ModeResult]) -> Vec<Row> {
    let mut rows = Vec::new();
    if results.iter().any(|r| r.handoffs > 0) {
        rows.push((
            "flusher handoffs",
            cells(results, |r| group(r.handoffs as f64)),
        ));
    }
    if results.iter().any(|r| r.takeovers > 0) {
        rows.push((
            "keeper takeovers",
            cells(results, |r| group(r.takeovers as f64)),
        ));
    }
    rows.push((
        "final flush",
        cells(results, |r| dur(r.flush_time.as_nanos() as u64)),
    ));
    rows.push((
        "consistency (DB = cache)",
        cells(results, |r| {
            if r.mismatched == 0 {
                format!("OK, {} compared", group(r.compared as f64))
            } else {
                format!(
                    "FAILED: {} of {} differ",
                    group(r.mismatched as f64),
                    group(r.compared as f64)
                )
            }
        }),
    ));
    rows
}

/// The rows as aligned text: labels left, `columns` cells right-aligned, a rule under the
/// first row.
fn render(rows: &[Row], columns: usize) -> String {
    let w0 = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .map(|(_, c)| c[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, (label, cells)) in rows.iter().enumerate() {
        let _ = write!(out, "{label:<w0$}");
        for (c, w) in cells.iter().zip(&widths) {
            let pad = w.saturating_sub(c.chars().count());
            let _ = write!(out, " | {}{c}", " ".repeat(pad));
        }
        out.push('\n');
        if i == 0 {
            let total = w0 + widths.iter().map(|w| w + 3).sum::<usize>();
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

/// The notes under the table: what "oldest unflushed write" means, and any write left
/// unwritten at close.
fn notes(results: &[ModeResult]) -> String {
    let mut out = String::new();
    let unstamped: u64 = results.iter().map(|r| r.unstamped).sum();
    let unwritten: usize = results.iter().map(|r| r.unwritten_at_close).sum();
    let _ = writeln!(
        out,
        "\noldest unflushed write: per flush window, the time from a key's first update to the \
         commit that carried it (write-through: the put itself).{}",
        if unstamped > 0 {
            format!(" {unstamped} row(s) raced their stamp and were not timed.")
        } else {
            String::new()
        }
    );
    if unwritten > 0 {
        let _ = writeln!(out, "WARNING: {unwritten} write(s) were unwritten at close");
    }
    out
}

const COLORS: [RGBColor; 2] = [RGBColor(200, 60, 40), RGBColor(30, 110, 200)];

/// What drawing the chart can fail with.
type PlotError = Box<dyn std::error::Error>;

/// Two panels, both modes in each: p99 write latency per time bucket (log scale) and
/// database rows written per second.
pub fn plot(path: &Path, results: &[ModeResult]) -> Result<(), PlotError> {
    let x_max = results
        .iter()
        .map(|r| r.seconds)
        .fold(1.0_f64, f64::max)
        .ceil();
    let root = SVGBackend::new(path, (1000, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(380);
    latency_panel(&top, results, x_max)?;
    rate_panel(&bottom, results, x_max)?;
    root.present()?;
    Ok(())
}

/// The top panel: write latency p99 per time bucket, in µs on a log scale.
fn latency_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    results: &[ModeResult],
    x_max: f64,
) -> Result<(), PlotError> {
    let secs = BUCKET.as_secs_f64();
    let lat: Vec<Vec<(f64, f64)>> = results
        .iter()
        .map(|r| {
            r.writes_over_time
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.is_empty())
                .map(|(i, h)| {
                    (
                        (i as f64 + 0.5) * secs,
                        h.value_at_quantile(0.99) as f64 / 1e3,
                    )
                })
                .collect()
        })
        .collect();
    let (lo, hi) = lat
        .iter()
        .flatten()
        .fold((f64::MAX, 0.0_f64), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    let (lo, hi) = if hi > 0.0 {
        ((lo / 2.0).max(0.01), hi * 2.0)
    } else {
        (0.01, 1.0)
    };
    let mut chart = panel(area, "write latency p99 per 250 ms (µs, log scale)")
        .build_cartesian_2d(0.0..x_max, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds into the run")
        .y_label_formatter(&|v| format!("{v}"))
        .draw()?;
    draw_modes(&mut chart, results, &lat)
}

/// The bottom panel: database rows written per second, per time bucket.
fn rate_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    results: &[ModeResult],
    x_max: f64,
) -> Result<(), PlotError> {
    let secs = BUCKET.as_secs_f64();
    let rate: Vec<Vec<(f64, f64)>> = results
        .iter()
        .map(|r| {
            let n = (r.seconds / secs).ceil() as usize + 1;
            (0..n)
                .map(|i| {
                    let rows = r.rows_over_time.get(i).copied().unwrap_or(0);
                    ((i as f64 + 0.5) * secs, rows as f64 / secs)
                })
                .collect()
        })
        .collect();
    let top_rate = rate.iter().flatten().map(|p| p.1).fold(1.0_f64, f64::max) * 1.1;
    let mut chart = panel(area, "database rows written per second")
        .build_cartesian_2d(0.0..x_max, 0.0..top_rate)?;
    chart
        .configure_mesh()
        .x_desc("seconds into the run (the last point includes the final flush)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    draw_modes(&mut chart, results, &rate)
}

/// A panel of the chart on `area`, titled `caption`, before its axes are set.
fn panel<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, Shift>,
    caption: &str,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60);
    builder
}

/// One line per mode (`series[i]` is the points of `results[i]`), in the mode's colour, and
/// the legend that names them.
fn draw_modes<'a, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    results: &[ModeResult],
    series: &[Vec<(f64, f64)>],
) -> Result<(), PlotError> {
    for (i, (r, pts)) in results.iter().zip(series).enumerate() {
        let c = COLORS[i % 2];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(mode_name(r.mode))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hdrhistogram::Histogram;
    use writebehind::WriteMode;

    use super::table;
    use crate::ModeResult;

    /// A run of `mode` with 1,000 updates in 2 s, none lost, and the given flusher counts.
    fn result(mode: WriteMode, handoffs: u64, takeovers: u64) -> ModeResult {
        let mut writes = Histogram::<u64>::new(3).expect("3 significant digits is valid");
        writes
            .record_n(1_000, 1_000)
            .expect("1 µs is inside the histogram's range");
        ModeResult {
            mode,
            seconds: 2.0,
            reads: Histogram::new(3).expect("3 significant digits is valid"),
            writes,
            writes_over_time: Vec::new(),
            rows_over_time: Vec::new(),
            transactions: 10,
            failed_transactions: 0,
            rows: 400,
            ages: Histogram::new(3).expect("3 significant digits is valid"),
            unstamped: 0,
            flush_time: Duration::from_millis(5),
            compared: 400,
            mismatched: 0,
            unwritten_at_close: 0,
            handoffs,
            takeovers,
        }
    }

    /// The cells of the row labelled `label` (trimmed), or `None` if the table has no such
    /// row.
    fn row(table: &str, label: &str) -> Option<Vec<String>> {
        table.lines().find(|l| l.starts_with(label)).map(|l| {
            l[label.len()..]
                .split('|')
                .skip(1)
                .map(|c| c.trim().to_string())
                .collect()
        })
    }

    /// The table of a write-through run, then a write-behind run with these flusher counts
    /// (the demo's default order).
    fn through_then_behind(handoffs: u64, takeovers: u64) -> String {
        table(
            "header".into(),
            &[
                result(WriteMode::Through, 0, 0),
                result(WriteMode::Behind, handoffs, takeovers),
            ],
        )
    }

    #[test]
    fn a_default_run_has_no_handoff_or_takeover_rows() {
        let out = through_then_behind(0, 0);
        assert_eq!(row(&out, "flusher handoffs"), None, "{out}");
        assert_eq!(row(&out, "keeper takeovers"), None, "{out}");
        assert_eq!(
            row(&out, "conflation (updates/row)"),
            Some(vec!["2.50".to_string(), "2.50".to_string()]),
            "{out}"
        );
    }

    #[test]
    fn a_niced_run_shows_its_handoffs_and_takeovers_in_its_own_column() {
        let out = through_then_behind(7, 1234);
        assert_eq!(
            row(&out, "flusher handoffs"),
            Some(vec!["0".to_string(), "7".to_string()]),
            "{out}"
        );
        assert_eq!(
            row(&out, "keeper takeovers"),
            Some(vec!["0".to_string(), "1,234".to_string()]),
            "{out}"
        );
        // Takeovers alone (no handoff) still get their row, and the handoffs none.
        let out = table("header".into(), &[result(WriteMode::Behind, 0, 3)]);
        assert_eq!(row(&out, "flusher handoffs"), None, "{out}");
        assert_eq!(
            row(&out, "keeper takeovers"),
            Some(vec!["3".to_string()]),
            "{out}"
        );
    }
}
