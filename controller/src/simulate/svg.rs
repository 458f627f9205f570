//! `controller simulate -o svg`: a picture of how full every GPU is after a run, one panel per
//! run, so two policies can be compared side by side at a glance.
//!
//! Each node is a row of GPUs; each GPU is a pair of bars, memory used of its total and cores
//! used of 100 %, with a tooltip (`<title>`) naming the GPU, its product and its figures.
//! Exclusive GPUs are drawn full and in another colour: nothing else may use them.

use super::Simulation;
use super::report::summary;
use crate::engine::Mode;
use std::fmt::Write;

const BAR_W: u32 = 7;
const BAR_H: u32 = 44;
/// Two bars and the gap after them.
const GPU_W: u32 = 2 * BAR_W + 6;
const LABEL_W: u32 = 120;
const ROW_H: u32 = BAR_H + 16;
/// Nodes per column before the next column starts, so a 100-node run stays viewable.
const ROWS_PER_COLUMN: usize = 16;
const PANEL_GAP: u32 = 40;
const HEADER_H: u32 = 76;
/// Average advance of a character of the title (14 px bold) and of the notes (12 px).
const TITLE_CHAR_W: f64 = 8.6;
const NOTE_CHAR_W: f64 = 6.6;
const LEGEND_H: u32 = 28;

const MEMORY: &str = "#3b78c3";
const CORES: &str = "#e08a2c";
const EXCLUSIVE: &str = "#9c3d54";
const EMPTY: &str = "#e6e8eb";

/// Escapes text for an SVG text node or attribute.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

/// The run's title: who placed the claims and how.
pub fn title(sim: &Simulation) -> String {
    match sim.engine.mode() {
        Mode::Controller => {
            let p = sim.engine.policies();
            format!(
                "controller: node {:?}, GPU {:?}, topology {:?}",
                p.node, p.gpu, p.topology
            )
        }
        Mode::Native => "native: the kube-scheduler's allocator".to_string(),
    }
}

/// The header's figures, two lines.
fn notes(s: &super::report::Summary) -> [String; 2] {
    [
        format!(
            "{} placed, {} refused; {} of {} GPUs in use",
            s.placed, s.refused, s.gpus_in_use, s.gpus
        ),
        format!(
            "{:.0}% of free memory is on partly used GPUs",
            s.fragmentation * 100.0
        ),
    ]
}

struct Panel<'a> {
    sim: &'a Simulation,
    columns: usize,
    gpus_per_node: u32,
}

impl Panel<'_> {
    fn new(sim: &Simulation) -> Panel<'_> {
        let nodes = sim.engine.state.nodes.len();
        Panel {
            sim,
            columns: nodes.div_ceil(ROWS_PER_COLUMN).max(1),
            gpus_per_node: sim
                .engine
                .state
                .nodes
                .iter()
                .map(|n| n.gpus.len() as u32)
                .max()
                .unwrap_or(0),
        }
    }

    fn column_width(&self) -> u32 {
        LABEL_W + self.gpus_per_node.max(1) * GPU_W + 12
    }

    /// Wide enough for the bars and for the header's text (estimated from its length: SVG
    /// has no text measurement).
    fn width(&self) -> u32 {
        let text = notes(&summary(self.sim))
            .iter()
            .map(|l| l.chars().count() as f64 * NOTE_CHAR_W)
            .fold(
                title(self.sim).chars().count() as f64 * TITLE_CHAR_W,
                f64::max,
            );
        (self.column_width() * self.columns as u32).max(text.ceil() as u32)
    }

    fn height(&self) -> u32 {
        let rows = self.sim.engine.state.nodes.len().min(ROWS_PER_COLUMN) as u32;
        HEADER_H + rows * ROW_H
    }

    fn draw(&self, out: &mut String, x0: u32, y0: u32) {
        let s = summary(self.sim);
        let _ = writeln!(
            out,
            r#"<text x="{x0}" y="{}" class="title">{}</text>"#,
            y0 + 18,
            esc(&title(self.sim))
        );
        for (i, line) in notes(&s).iter().enumerate() {
            let _ = writeln!(
                out,
                r#"<text x="{x0}" y="{}" class="note">{}</text>"#,
                y0 + 36 + 16 * i as u32,
                esc(line)
            );
        }
        let state = &self.sim.engine.state;
        for (i, node) in state.nodes.iter().enumerate() {
            let x = x0 + (i / ROWS_PER_COLUMN) as u32 * self.column_width();
            let y = y0 + HEADER_H + (i % ROWS_PER_COLUMN) as u32 * ROW_H;
            let name: String = node.view.name.chars().take(18).collect();
            let _ = writeln!(
                out,
                r#"<text x="{x}" y="{}" class="node">{}</text>"#,
                y + BAR_H / 2 + 4,
                esc(&name)
            );
            for (j, &g) in node.gpus.iter().enumerate() {
                let gpu = &state.gpus[g];
                let gx = x + LABEL_W + j as u32 * GPU_W;
                let memory = ratio(gpu.used.memory_bytes, gpu.total.memory_bytes);
                let cores = ratio(u64::from(gpu.used.cores), u64::from(gpu.total.cores));
                let (memory, cores, colours) = if gpu.exclusive {
                    (1.0, 1.0, (EXCLUSIVE, EXCLUSIVE))
                } else {
                    (memory, cores, (MEMORY, CORES))
                };
                let product = match gpu.device.attributes.get("productName") {
                    Some(vgpu_driver::slice::AttributeValue::String(p)) => p.as_str(),
                    _ => "?",
                };
                let tip = format!(
                    "{} {} ({}): memory {} / {} GiB, cores {} / {} %, {} claim(s){}",
                    node.view.name,
                    gpu.device.name,
                    product,
                    gib(gpu.used.memory_bytes.min(gpu.total.memory_bytes)),
                    gib(gpu.total.memory_bytes),
                    gpu.used.cores.min(gpu.total.cores),
                    gpu.total.cores,
                    gpu.holders,
                    if gpu.exclusive { ", exclusive" } else { "" }
                );
                let _ = writeln!(out, "<g><title>{}</title>", esc(&tip));
                bar(out, gx, y, memory, colours.0);
                bar(out, gx + BAR_W + 1, y, cores, colours.1);
                let _ = writeln!(out, "</g>");
            }
        }
    }
}

fn ratio(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        (used as f64 / total as f64).clamp(0.0, 1.0)
    }
}

/// One bar: its capacity in grey, filled from the bottom to `fill` (0 to 1).
fn bar(out: &mut String, x: u32, y: u32, fill: f64, colour: &str) {
    let h = (fill * f64::from(BAR_H)).round() as u32;
    let _ = writeln!(
        out,
        r#"<rect x="{x}" y="{y}" width="{BAR_W}" height="{BAR_H}" fill="{EMPTY}"/>"#
    );
    if h > 0 {
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{}" width="{BAR_W}" height="{h}" fill="{colour}"/>"#,
            y + BAR_H - h
        );
    }
}

/// The picture of one run, or of several side by side (the same cluster and workload under
/// different policies or modes).
pub fn render(runs: &[&Simulation]) -> String {
    let panels: Vec<Panel> = runs.iter().map(|s| Panel::new(s)).collect();
    let width = panels.iter().map(Panel::width).sum::<u32>()
        + PANEL_GAP * panels.len().saturating_sub(1) as u32
        + 32;
    let height = panels.iter().map(Panel::height).max().unwrap_or(0) + LEGEND_H + 32;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        out,
        "<style>.title{{font-size:14px;font-weight:bold}} .note{{font-size:12px;fill:#444}} .node{{font-size:11px}} .legend{{font-size:11px}}</style>"
    );
    let _ = writeln!(
        out,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let mut x = 16;
    for panel in &panels {
        panel.draw(&mut out, x, 16);
        x += panel.width() + PANEL_GAP;
    }
    let y = height - LEGEND_H;
    for (i, (colour, label)) in [
        (MEMORY, "memory used"),
        (CORES, "cores used"),
        (EXCLUSIVE, "exclusive GPU"),
    ]
    .iter()
    .enumerate()
    {
        let lx = 16 + i as u32 * 140;
        let _ = writeln!(
            out,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{colour}"/><text x="{}" y="{}" class="legend">{label}</text>"#,
            y,
            lx + 18,
            y + 10
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Policies;
    use crate::simulate::{default, input, run};
    use vgpu_driver::config::{Policy, Topology};

    fn simulate(node: Policy, gpu: Policy) -> Simulation {
        let workload = input::parse(&default::yaml()).unwrap();
        run(
            vgpu_driver::DEFAULT_DRIVER_NAME,
            workload,
            Policies {
                node,
                gpu,
                topology: Topology::Preferred,
            },
            Mode::Controller,
        )
    }

    /// The bars' heights, in drawing order: (fill colour, height).
    fn fills(svg: &str) -> Vec<(String, u32)> {
        svg.lines()
            .filter(|l| l.starts_with("<rect x=") && !l.contains(EMPTY) && !l.contains("legend"))
            .filter(|l| !l.contains(r#"width="12""#))
            .map(|l| {
                let attr = |name: &str| {
                    let start = l.find(&format!(r#" {name}=""#)).unwrap() + name.len() + 3;
                    l[start..].split('"').next().unwrap().to_string()
                };
                (attr("fill"), attr("height").parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn every_gpu_is_drawn_with_its_fill_and_a_tooltip() {
        let sim = simulate(Policy::Binpack, Policy::Spread);
        let svg = render(&[&sim]);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        let gpus = sim.engine.state.gpus.len();
        assert_eq!(svg.matches("<title>").count(), gpus);
        // Grey capacity bars: two per GPU.
        assert_eq!(svg.matches(EMPTY).count(), 2 * gpus);
        // The memory drawn is the memory used: the sum of the filled heights matches the
        // state's own figures, bar by bar.
        let mut expected = Vec::new();
        for node in &sim.engine.state.nodes {
            for &g in &node.gpus {
                let gpu = &sim.engine.state.gpus[g];
                let (m, c) = if gpu.exclusive {
                    (1.0, 1.0)
                } else {
                    (
                        ratio(gpu.used.memory_bytes, gpu.total.memory_bytes),
                        ratio(u64::from(gpu.used.cores), u64::from(gpu.total.cores)),
                    )
                };
                for f in [m, c] {
                    let h = (f * f64::from(BAR_H)).round() as u32;
                    if h > 0 {
                        expected.push(h);
                    }
                }
            }
        }
        let drawn: Vec<u32> = fills(&svg).into_iter().map(|(_, h)| h).collect();
        assert_eq!(drawn, expected);
        assert!(
            drawn.iter().any(|h| *h > 0),
            "the default workload uses some GPU"
        );
        let s = summary(&sim);
        assert!(svg.contains(&format!(
            "{} placed, {} refused; {} of {} GPUs in use",
            s.placed, s.refused, s.gpus_in_use, s.gpus
        )));
    }

    #[test]
    fn two_runs_are_drawn_side_by_side_with_their_own_titles_and_figures() {
        let binpack = simulate(Policy::Binpack, Policy::Binpack);
        let spread = simulate(Policy::Spread, Policy::Spread);
        let svg = render(&[&binpack, &spread]);
        assert!(svg.contains("node Binpack, GPU Binpack"), "{svg}");
        assert!(svg.contains("node Spread, GPU Spread"), "{svg}");
        let gpus = binpack.engine.state.gpus.len() + spread.engine.state.gpus.len();
        assert_eq!(svg.matches("<title>").count(), gpus);
        let one = render(&[&binpack]);
        let width = |svg: &str| -> u32 {
            let start = svg.find(r#"width=""#).unwrap() + 7;
            svg[start..].split('"').next().unwrap().parse().unwrap()
        };
        assert!(width(&svg) > width(&one) + Panel::new(&spread).width());
        // Spreading touches more GPUs than binpacking the same claims.
        assert!(summary(&spread).gpus_in_use > summary(&binpack).gpus_in_use);
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(esc(r#"<a & "b">"#), "&lt;a &amp; &quot;b&quot;&gt;");
    }
}
