//! `run --plot FILE.html`: throughput and latency over time as one self-contained HTML page.
//!
//! The page is inline SVG drawn here, with no script and no external resource (no fonts, no
//! JavaScript library, no network), so that it opens the same on an air-gapped machine, in a
//! CI artifact viewer and in ten years. Its data are the run's per-second samples (the progress
//! lines): messages sent and acknowledged per second, PUBACK p50/p99/max of each second, and
//! with `--e2e` publish -> readable p50/p99 of each second. Latency is on a log scale, since a
//! stall is often orders of magnitude above the median. Every point has a tooltip (`<title>`)
//! with its exact value, and a table of the samples follows the charts.

use std::fmt::Write as _;

use crate::report::Sample;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;

/// One line of a chart.
struct Series<'a> {
    name: &'a str,
    color: &'a str,
    /// One value per sample; `None` leaves a gap.
    values: Vec<Option<f64>>,
    /// Thinner, dashed: a secondary line.
    dashed: bool,
}

/// The whole page.
pub fn html(label: &str, config: &str, samples: &[Sample]) -> String {
    let times: Vec<f64> = samples.iter().map(|s| s.at_secs).collect();
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>ingot-load: {title}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}\n\
         h1 {{ font-size: 1.3em; }} h2 {{ font-size: 1.05em; margin-top: 1.5em; }}\n\
         svg text {{ font-size: 12px; fill: #333; }}\n\
         table {{ border-collapse: collapse; font-size: 12px; }}\n\
         td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}\n\
         </style>\n</head>\n<body>\n<h1>{title}</h1>\n<p>{config}</p>\n",
        title = escape(label),
        config = escape(config),
    );
    if samples.is_empty() {
        out.push_str("<p>No samples: the run was shorter than a second.</p>\n</body>\n</html>\n");
        return out;
    }
    let throughput = [
        Series {
            name: "sent/s",
            color: "#1f77b4",
            values: samples.iter().map(|s| Some(s.sent_per_sec)).collect(),
            dashed: true,
        },
        Series {
            name: "acked/s",
            color: "#2ca02c",
            values: samples.iter().map(|s| Some(s.acked_per_sec)).collect(),
            dashed: false,
        },
    ];
    out.push_str("<h2>Throughput (messages per second)</h2>\n");
    chart(&mut out, samples, &times, &throughput, Scale::Linear);

    let us = |v: Option<u64>| v.map(|v| v as f64);
    let mut latency = vec![
        Series {
            name: "PUBACK p50",
            color: "#9467bd",
            values: samples.iter().map(|s| us(s.p50_us)).collect(),
            dashed: true,
        },
        Series {
            name: "PUBACK p99",
            color: "#d62728",
            values: samples.iter().map(|s| us(s.p99_us)).collect(),
            dashed: false,
        },
        Series {
            name: "PUBACK max",
            color: "#7f7f7f",
            values: samples.iter().map(|s| us(s.max_us)).collect(),
            dashed: true,
        },
    ];
    if samples.iter().any(|s| s.e2e) {
        latency.push(Series {
            name: "e2e p50",
            color: "#17becf",
            values: samples.iter().map(|s| us(s.e2e_p50_us)).collect(),
            dashed: true,
        });
        latency.push(Series {
            name: "e2e p99",
            color: "#ff7f0e",
            values: samples.iter().map(|s| us(s.e2e_p99_us)).collect(),
            dashed: false,
        });
    }
    out.push_str("<h2>Latency of each second (log scale)</h2>\n");
    chart(&mut out, samples, &times, &latency, Scale::LogMicros);

    table(&mut out, samples);
    out.push_str("</body>\n</html>\n");
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    Linear,
    /// Microseconds on a log10 axis.
    LogMicros,
}

fn chart(out: &mut String, samples: &[Sample], times: &[f64], series: &[Series<'_>], scale: Scale) {
    let t0 = times.first().copied().unwrap_or(0.0).min(0.0);
    let t1 = times.last().copied().unwrap_or(1.0).max(t0 + 1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: f64| LEFT + (t - t0) / (t1 - t0) * plot_w;
    let values = series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied())
        .filter(|v| v.is_finite());
    let (lo, hi) = match scale {
        Scale::Linear => {
            let max = values.fold(0.0f64, f64::max);
            (0.0, nice_ceiling(max.max(1.0) * 1.05))
        }
        Scale::LogMicros => {
            let (min, max) = values
                .filter(|v| *v > 0.0)
                .fold((f64::MAX, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
            if max <= 0.0 {
                (1.0, 1000.0)
            } else {
                (
                    10f64.powf(min.log10().floor()),
                    10f64.powf(max.log10().ceil().max(min.log10().floor() + 1.0)),
                )
            }
        }
    };
    let y = |v: f64| match scale {
        Scale::Linear => TOP + plot_h - (v - lo) / (hi - lo) * plot_h,
        Scale::LogMicros => {
            let v = v.max(lo);
            TOP + plot_h - (v.log10() - lo.log10()) / (hi.log10() - lo.log10()) * plot_h
        }
    };
    let _ = writeln!(
        out,
        "<svg width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         role=\"img\">"
    );
    // Phases other than the measured one are shaded, each labelled once.
    let mut start = 0usize;
    while start < samples.len() {
        let phase = samples.get(start).map_or("", |s| s.phase);
        let mut end = start;
        while samples.get(end + 1).is_some_and(|s| s.phase == phase) {
            end += 1;
        }
        let from = if start == 0 {
            t0
        } else {
            times.get(start - 1).copied().unwrap_or(t0)
        };
        let to = times.get(end).copied().unwrap_or(t1);
        let fill = if phase == "measure" {
            "#ffffff"
        } else {
            "#eeeeee"
        };
        let _ = writeln!(
            out,
            "<rect x=\"{:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{plot_h}\" fill=\"{fill}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            x(from),
            (x(to) - x(from)).max(0.0),
            x(from) + 4.0,
            TOP + 14.0,
            escape(phase)
        );
        start = end + 1;
    }
    // Axes and grid.
    let ticks: Vec<(f64, String)> = match scale {
        Scale::Linear => {
            let step = hi / 5.0;
            (0..=5)
                .map(|k| (lo + step * k as f64, si(lo + step * k as f64)))
                .collect()
        }
        Scale::LogMicros => {
            let mut ticks = Vec::new();
            let mut v = lo;
            while v <= hi * 1.0001 {
                ticks.push((v, micros(v)));
                v *= 10.0;
            }
            ticks
        }
    };
    for (v, text) in &ticks {
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + plot_w,
            y(*v),
            y(*v),
            LEFT - 6.0,
            y(*v) + 4.0,
            escape(text)
        );
    }
    let t_step = nice_ceiling((t1 - t0) / 10.0).max(1.0);
    let mut t = (t0 / t_step).ceil() * t_step;
    while t <= t1 + 1e-9 {
        let _ = writeln!(
            out,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t}s</text>",
            x(t),
            x(t),
            TOP + plot_h,
            TOP + plot_h + 5.0,
            x(t),
            TOP + plot_h + 18.0
        );
        t += t_step;
    }
    let _ = writeln!(
        out,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" \
         stroke=\"#999\"/>"
    );
    // The lines, broken where a second has no value, and a point with a tooltip per value.
    for s in series {
        let dash = if s.dashed {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let mut run: Vec<(f64, f64)> = Vec::new();
        let mut points = String::new();
        let flush = |run: &mut Vec<(f64, f64)>, out: &mut String| {
            if run.len() > 1 {
                let coords: Vec<String> = run
                    .iter()
                    .map(|(px, py)| format!("{px:.1},{py:.1}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"{}\"{dash} \
                     points=\"{}\"/>",
                    s.color,
                    if s.dashed { 1.5 } else { 2.0 },
                    coords.join(" ")
                );
            }
            run.clear();
        };
        for (value, t) in s.values.iter().zip(times) {
            match value {
                Some(v) if v.is_finite() && (scale == Scale::Linear || *v > 0.0) => {
                    let (px, py) = (x(*t), y(*v));
                    run.push((px, py));
                    let shown = match scale {
                        Scale::Linear => si(*v),
                        Scale::LogMicros => micros(*v),
                    };
                    let _ = write!(
                        points,
                        "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"2.5\" fill=\"{}\">\
                         <title>{} at {t:.1}s: {}</title></circle>",
                        s.color,
                        escape(s.name),
                        escape(&shown)
                    );
                }
                _ => flush(&mut run, out),
            }
        }
        flush(&mut run, out);
        out.push_str(&points);
        out.push('\n');
    }
    // Legend.
    let mut lx = LEFT;
    let ly = HEIGHT - 8.0;
    for s in series {
        let _ = writeln!(
            out,
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"14\" height=\"4\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{ly:.1}\">{}</text>",
            ly - 6.0,
            s.color,
            lx + 18.0,
            escape(s.name)
        );
        lx += 30.0 + 7.5 * s.name.len() as f64;
    }
    out.push_str("</svg>\n");
}

fn table(out: &mut String, samples: &[Sample]) {
    out.push_str(
        "<h2>Samples</h2>\n<table>\n<tr><th>t (s)</th><th>phase</th><th>sent/s</th>\
         <th>acked/s</th><th>p50 us</th><th>p99 us</th><th>max us</th><th>e2e p50 us</th>\
         <th>e2e p99 us</th><th>conns</th><th>errors</th></tr>\n",
    );
    let opt = |v: Option<u64>| v.map_or_else(String::new, |v| v.to_string());
    for s in samples {
        let _ = writeln!(
            out,
            "<tr><td>{:.1}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            s.at_secs,
            escape(s.phase),
            s.sent_per_sec,
            s.acked_per_sec,
            opt(s.p50_us),
            opt(s.p99_us),
            opt(s.max_us),
            opt(s.e2e_p50_us),
            opt(s.e2e_p99_us),
            s.connected,
            s.errors
        );
    }
    out.push_str("</table>\n");
}

/// The smallest 1, 2 or 5 times a power of ten that is at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let base = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * base)
        .find(|c| *c >= v * 0.999_999)
        .unwrap_or(10.0 * base)
}

fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// `15000.0` as `15 ms`, `1234.0` as `1.234 ms`.
fn micros(us: f64) -> String {
    let (value, unit) = if us >= 1e6 {
        (us / 1e6, "s")
    } else if us >= 1e3 {
        (us / 1e3, "ms")
    } else {
        (us.round(), "us")
    };
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {unit}")
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, phase: &'static str, p99: Option<u64>) -> Sample {
        Sample {
            phase,
            at_secs: t,
            sent_per_sec: 1000.0 * t,
            acked_per_sec: 900.0 * t,
            acked_total: 0,
            p50_us: p99.map(|v| v / 2),
            p99_us: p99,
            max_us: p99.map(|v| v * 3),
            e2e_p50_us: None,
            e2e_p99_us: None,
            e2e: false,
            connected: 4,
            devices: 4,
            errors: 0,
        }
    }

    #[test]
    fn a_page_with_both_charts_and_no_external_resource() {
        let samples = [
            sample(1.0, "warmup", Some(120)),
            sample(2.0, "measure", None),
            sample(3.0, "measure", Some(15_000)),
            sample(4.0, "measure", Some(900)),
        ];
        let page = html("a <run>", "mqtt 127.0.0.1:1883", &samples);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert_eq!(page.matches("<svg").count(), 2);
        assert!(page.contains("a &lt;run&gt;"));
        assert!(!page.contains("http"), "no external reference");
        assert!(!page.contains("<script"));
        // The p99 line breaks at the second without a value: no line through it.
        assert!(page.contains("PUBACK p99 at 3.0s: 15 ms"));
        assert!(page.contains(">10 ms</text>"), "decade ticks");
        assert_eq!(page.matches("<tr>").count(), 1 + samples.len());
        assert!(
            !page.contains("e2e p99</text>"),
            "no e2e series without --e2e"
        );
        assert!(html("x", "", &[]).contains("No samples"));
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(12_000.0), 20_000.0);
        assert_eq!(nice_ceiling(500.0), 500.0);
        assert_eq!(nice_ceiling(501.0), 1000.0);
    }
}
