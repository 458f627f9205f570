//! The monitoring shipped with the chart (deploy/helm/vgpu-dra/files/monitoring) against the code:
//! the dashboard and the alerts parse, and every metric their PromQL names is one the two
//! binaries expose. The names come from the binaries' own registries, rendered, so a renamed
//! or removed metric fails here instead of leaving a blank panel or an alert that never fires.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// Metrics the queries may use that neither binary exposes: Prometheus' own scrape health.
const EXTERNAL: &[&str] = &["up"];

/// PromQL words that look like metric names but are not.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    // Aggregations, which may come before their `by (...)`: `sum by (le) (...)`.
    "sum",
    "avg",
    "count",
    "min",
    "max",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// What follows these is a list of label names in parentheses.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn monitoring_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/vgpu-dra/files/monitoring")
}

/// The sample names of an exposition: each `# TYPE` family with the suffixes its type gives
/// its samples.
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "summary" => &["", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

/// Everything both binaries expose, each metric made to show at least one sample (a family
/// without one is not rendered). A metric added to a binary but not set here is missing from
/// the set: the check then fails on a query that uses it, never passes one it should not.
fn known_names() -> BTreeSet<String> {
    let plugin = kubelet_plugin::metrics::Metrics::with_usage(
        kubelet_plugin::usage::UsageCollector::new(Vec::new),
    );
    plugin.prepared(true);
    plugin.unprepared(true);
    plugin.observe_prepare(Duration::from_millis(1), Duration::from_micros(200));
    plugin.observe_unprepare(Duration::from_millis(1));
    plugin.set_published_devices(1);
    plugin.set_registered(true);
    plugin.set_prepared_claims(1);
    plugin.set_sharing_mode(kubelet_plugin::publish::SharingMode::Controller);
    plugin.set_gpu_health(&kubelet_plugin::discovery::Snapshot {
        gpus: vec![test_support::gpu(0)],
        unhealthy: Default::default(),
    });
    // A family renders only once it has a sample: one each.
    let controller = controller::run::metrics::Metrics::new();
    let gpu = controller::run::metrics::GpuLabels {
        node: "n".into(),
        device: "gpu-0".into(),
        uuid: "GPU-0".into(),
        index: "0".into(),
        model: "H100".into(),
    };
    controller.allocated.inc();
    controller
        .refused
        .get_or_create(&controller::run::metrics::RefusalLabels {
            reason: "insufficient_capacity".into(),
        })
        .inc();
    controller.conflicts.inc();
    controller.decision_seconds.observe(0.001);
    controller
        .gpu_memory_allocated_bytes
        .get_or_create(&gpu)
        .set(1);
    controller
        .gpu_cores_allocated_percent
        .get_or_create(&gpu)
        .set(1);
    controller.gpu_memory_free_bytes.get_or_create(&gpu).set(1);
    controller.gpu_cores_free_percent.get_or_create(&gpu).set(1);
    controller.gpu_claims.get_or_create(&gpu).set(1);
    controller
        .node_fragmentation
        .get_or_create(&controller::run::metrics::NodeLabels { node: "n".into() })
        .set(0.5);
    controller
        .pending
        .get_or_create(&controller::run::metrics::PendingLabels {
            reason: "insufficient_capacity".into(),
        })
        .set(1);
    controller.leader.set(1);
    let mut names = exposed(&plugin.encode());
    names.extend(exposed(&controller.render()));
    names
}

/// The metric names a PromQL expression selects: identifiers outside strings, label matchers,
/// ranges and grouping lists that are not functions or keywords.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_group = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < chars.len() {
            if chars[i] == open {
                depth += 1;
            } else if chars[i] == close {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '$' || c.is_ascii_digit() {
            // A dashboard variable or a number (durations like 5m included).
            i += 1;
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if ident_start(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = chars.get(next) == Some(&'(');
            if GROUPING.contains(&word.to_lowercase().as_str()) {
                if called {
                    i = skip_group(next, '(', ')');
                }
            } else if !called && !KEYWORDS.contains(&word.to_lowercase().as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The expressions of a dashboard: panel targets (rows nest panels) and the metric of each
/// `label_values(metric, label)` variable.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn panels(list: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_string();
            if panel["type"] != "row" {
                let targets = panel["targets"].as_array().cloned().unwrap_or_default();
                assert!(!targets.is_empty(), "panel {title:?} has no query");
                for t in targets {
                    let expr = t["expr"].as_str().unwrap_or_default().to_string();
                    out.push((format!("panel {title:?}"), expr));
                }
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or_default();
        if let Some(args) = query.strip_prefix("label_values(") {
            let metric = args.split([',', ')']).next().unwrap_or_default();
            out.push((format!("variable {}", var["name"]), metric.to_string()));
        }
    }
    out
}

fn rule_exprs(rules: &serde_yaml_ng::Value) -> Vec<(String, String)> {
    assert_eq!(rules["kind"].as_str(), Some("PrometheusRule"));
    let mut out = Vec::new();
    for group in rules["spec"]["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let name = rule["alert"]
                .as_str()
                .or_else(|| rule["record"].as_str())
                .unwrap_or("?");
            let expr = rule["expr"].as_str().unwrap_or_default();
            out.push((format!("rule {name}"), expr.to_string()));
        }
    }
    out
}

/// Each query names at least one metric and only metrics that exist; returns what is wrong.
fn unknown(exprs: &[(String, String)], known: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (place, expr) in exprs {
        let names = metric_names(expr);
        if names.is_empty() {
            problems.push(format!("{place}: {expr:?} names no metric"));
        }
        for name in names {
            if !known.contains(&name) && !EXTERNAL.contains(&name.as_str()) {
                problems.push(format!("{place}: {name} is not exposed by either binary"));
            }
        }
    }
    problems
}

#[test]
fn the_scanner_finds_metric_names_and_only_them() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"x-y", le!="1"}[5m]))) / on (pod) group_left b"#
        ),
        vec!["a_bucket", "b"]
    );
    assert_eq!(
        metric_names("sum(x{namespace=~\"$namespace\"}) by (namespace) > 0 and y < 1 or vector(0)"),
        vec!["x", "y"]
    );
    assert_eq!(metric_names("count(m == 0) or vector(0)"), vec!["m"]);
    let known = BTreeSet::from(["x_total".to_string()]);
    let problems = unknown(
        &[
            ("p".into(), "rate(x_total[5m]) + rate(x_totl[5m])".into()),
            ("q".into(), "vector(1)".into()),
        ],
        &known,
    );
    assert_eq!(
        problems,
        vec![
            "p: x_totl is not exposed by either binary".to_string(),
            "q: \"vector(1)\" names no metric".to_string(),
        ]
    );
}

#[test]
fn the_registries_render_what_the_check_relies_on() {
    let known = known_names();
    for name in [
        "vgpu_kubelet_plugin_claim_memory_used_bytes",
        "vgpu_kubelet_plugin_claim_memory_refused_allocations_total",
        "vgpu_kubelet_plugin_prepare_duration_seconds_bucket",
        "vgpu_kubelet_plugin_gpu_healthy",
        "vgpu_controller_claims_refused_total",
        "vgpu_controller_pending_claims",
        "vgpu_controller_gpu_memory_free_bytes",
        "vgpu_controller_node_memory_fragmentation_ratio",
    ] {
        assert!(known.contains(name), "{name} missing from {known:#?}");
    }
}

#[test]
fn the_dashboard_queries_only_metrics_that_exist() {
    let path = monitoring_dir().join("vgpu-dra-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() > 10, "{exprs:?}");
    let problems = unknown(&exprs, &known_names());
    assert!(
        problems.is_empty(),
        "{}:\n{}",
        path.display(),
        problems.join("\n")
    );
}

#[test]
fn the_alerts_query_only_metrics_that_exist() {
    let path = monitoring_dir().join("prometheusrule.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    let exprs = rule_exprs(&rules);
    let alerts: Vec<&str> = exprs.iter().map(|(p, _)| p.as_str()).collect();
    for want in [
        "rule VgpuClaimPendingTooLong",
        "rule VgpuGpuUnhealthy",
        "rule VgpuKubeletPluginNotRegistered",
        "rule VgpuSliceOverMemoryCap",
    ] {
        assert!(alerts.contains(&want), "{want} missing: {alerts:?}");
    }
    let problems = unknown(&exprs, &known_names());
    assert!(
        problems.is_empty(),
        "{}:\n{}",
        path.display(),
        problems.join("\n")
    );
}
