//! The checks of one Envoy document: each plugin's configuration, then the chain around them.

use crate::plugins::{Filter, Parsed, Plugin};
use crate::yaml::{self, Node};
use crate::{Finding, Severity};

const BUFFER_FILTER: &str = "envoy.filters.http.buffer";
const BUFFER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer";

/// The clusters a plugin may name: `None` when they come from CDS and cannot be known here.
struct Clusters<'a, 'i>(Option<Vec<(&'a str, &'a Node<'i>)>>);

impl<'a, 'i> Clusters<'a, 'i> {
    fn read(doc: &'a Node<'i>) -> Clusters<'a, 'i> {
        if yaml::path(doc, &["dynamic_resources", "cds_config"]).is_some() {
            return Clusters(None);
        }
        let clusters = yaml::items(yaml::path(doc, &["static_resources", "clusters"]));
        Clusters(Some(
            clusters
                .iter()
                .filter_map(|c| Some((yaml::str_at(c, &["name"])?, c)))
                .collect(),
        ))
    }

    fn find(&self, name: &str) -> Lookup<'a, 'i> {
        match &self.0 {
            None => Lookup::Unknown,
            Some(c) => c
                .iter()
                .find_map(|(n, c)| (*n == name).then_some(Lookup::Found(c)))
                .unwrap_or(Lookup::Missing),
        }
    }

    fn lacks(&self, name: &str) -> bool {
        matches!(self.find(name), Lookup::Missing)
    }
}

enum Lookup<'a, 'i> {
    /// The clusters come from CDS.
    Unknown,
    Missing,
    Found(&'a Node<'i>),
}

/// Whether a cluster speaks HTTP/2 to its hosts, as gRPC needs: `http2_protocol_options` in
/// its `HttpProtocolOptions` (explicit, or offered by ALPN with `auto_config`), or in the
/// cluster's own deprecated field.
fn speaks_http2(cluster: &Node<'_>) -> bool {
    if yaml::get(cluster, "http2_protocol_options").is_some() {
        return true;
    }
    let Some(options) =
        yaml::get(cluster, "typed_extension_protocol_options").and_then(|o| o.data.as_mapping())
    else {
        return false;
    };
    options.values().any(|o| {
        yaml::path(o, &["explicit_http_config", "http2_protocol_options"]).is_some()
            || yaml::path(o, &["auto_config", "http2_protocol_options"]).is_some()
    })
}

/// What the lints of one chain see.
struct Chain<'a, 'i> {
    file: &'a str,
    /// The `http_filters` entries.
    entries: &'a [Node<'i>],
    /// Ours among them, in order.
    ours: Vec<Filter>,
    /// The connection manager holding them (its `route_config`).
    manager: &'a Node<'i>,
}

pub fn document(file: &str, text: &str, doc: &Node<'_>, out: &mut Vec<Finding>) {
    let clusters = Clusters::read(doc);
    let mut maps = Vec::new();
    yaml::mappings(doc, &mut maps);
    for manager in maps {
        let entries = yaml::items(yaml::get(manager, "http_filters"));
        if entries.is_empty() {
            continue;
        }
        let ours = entries
            .iter()
            .enumerate()
            .flat_map(|(i, e)| Filter::read(text, e, i))
            .collect();
        let chain = Chain {
            file,
            entries,
            ours,
            manager,
        };
        chain.configs(out);
        chain.buffer(out);
        chain.flag_sources(&clusters, out);
        chain.etcd_stores(&clusters, out);
        chain.rate_limit_services(&clusters, out);
        chain.route_values(out);
        chain.order(out);
    }
}

impl Chain<'_, '_> {
    fn finding(
        &self,
        line: usize,
        plugin: Option<Plugin>,
        path: impl Into<String>,
        severity: Severity,
        message: impl Into<String>,
    ) -> Finding {
        Finding {
            file: self.file.to_string(),
            line,
            plugin,
            path: path.into(),
            severity,
            message: message.into(),
        }
    }

    /// A cluster field of `f`'s configuration naming a cluster the YAML does not define.
    fn undefined_cluster(&self, f: &Filter, field: &str, cluster: &str, then: &str) -> Finding {
        let path = f.path(field);
        self.finding(
            f.line_of(&path),
            Some(f.plugin),
            path,
            Severity::Error,
            format!("\"{cluster}\" is not a cluster of static_resources.clusters: {then}"),
        )
    }

    /// Each configuration, read by its plugin's parser: what Envoy would refuse at load.
    fn configs(&self, out: &mut Vec<Finding>) {
        for f in &self.ours {
            if let Err(e) = &f.config {
                let (line, message) = match f.syntax_error_line() {
                    // serde's message ends with the JSON's own line and column.
                    Some(line) => (
                        line,
                        format!(
                            "{} of the JSON in the `value` at line {}",
                            e.message, f.config_line
                        ),
                    ),
                    None => (f.line_of(&e.field), e.message.clone()),
                };
                out.push(self.finding(
                    line,
                    (!f.whole).then_some(f.plugin),
                    &e.field,
                    Severity::Error,
                    format!("{message}: Envoy refuses this configuration"),
                ));
            }
        }
    }

    /// Idempotency needs Envoy's buffer filter after it, holding at least `maxBodyBytes`.
    fn buffer(&self, out: &mut Vec<Finding>) {
        for f in &self.ours {
            let Ok(Parsed::Idempotency(config)) = &f.config else {
                continue;
            };
            let buffer = self
                .entries
                .iter()
                .skip(f.index + 1)
                .find(|e| yaml::is_filter(e, BUFFER_FILTER, BUFFER_TYPE));
            let Some(buffer) = buffer else {
                out.push(self.finding(
                    f.line,
                    Some(f.plugin),
                    format!("http_filters[{}]", f.index),
                    Severity::Error,
                    format!(
                        "no {BUFFER_FILTER} after idempotency: a duplicate's headers reach the \
                         application before the plugin has read the body and answered, and \
                         Envoy then resets that upstream request (plugins/idempotency/README.md)"
                    ),
                ));
                continue;
            };
            let max = yaml::path(buffer, &["typed_config", "max_request_bytes"]);
            let Some((max, line)) = max.and_then(|m| Some((yaml::integer(m)?, yaml::line(m))))
            else {
                continue;
            };
            if u64::try_from(max).unwrap_or(0) < config.max_body_bytes {
                out.push(self.finding(
                    line,
                    Some(f.plugin),
                    "maxBodyBytes",
                    Severity::Error,
                    format!(
                        "the buffer filter's max_request_bytes {max} is below idempotency's \
                         maxBodyBytes {}: a body between the two, which idempotency accepts, \
                         gets the buffer filter's 413 instead",
                        config.max_body_bytes
                    ),
                ));
            }
        }
    }

    /// A flag source whose cluster the YAML does not define is never fetched.
    fn flag_sources(&self, clusters: &Clusters<'_, '_>, out: &mut Vec<Finding>) {
        for f in &self.ours {
            let Ok(Parsed::FlagRouter(config)) = &f.config else {
                continue;
            };
            let Some(source) = &config.source else {
                continue;
            };
            if clusters.lacks(&source.cluster) {
                out.push(self.undefined_cluster(
                    f,
                    "source.cluster",
                    &source.cluster,
                    "every fetch of the flag document fails, so the router only ever has its \
                     inline flags",
                ));
            }
        }
    }

    /// An etcd store whose cluster the YAML does not define is never reached.
    fn etcd_stores(&self, clusters: &Clusters<'_, '_>, out: &mut Vec<Finding>) {
        use idempotency::etcd::FailureMode;
        for f in &self.ours {
            let Ok(Parsed::Idempotency(config)) = &f.config else {
                continue;
            };
            let Some(etcd) = &config.store else {
                continue;
            };
            if clusters.lacks(&etcd.cluster) {
                let then = match etcd.failure_mode {
                    FailureMode::Closed => "gets 503 (failureMode \"closed\")",
                    FailureMode::Open => {
                        "is forwarded without a record, so a duplicate runs again \
                         (failureMode \"open\")"
                    }
                };
                out.push(self.undefined_cluster(
                    f,
                    "store.etcd.cluster",
                    &etcd.cluster,
                    &format!("no request reaches etcd, so every keyed request {then}"),
                ));
            }
        }
    }

    /// A rule's rate limit service is reached through a cluster the YAML defines, over HTTP/2
    /// (the service is gRPC).
    fn rate_limit_services(&self, clusters: &Clusters<'_, '_>, out: &mut Vec<Finding>) {
        use rate_limit::global::FailureMode;
        for f in &self.ours {
            let Ok(Parsed::RateLimit(config)) = &f.config else {
                continue;
            };
            for (i, rule) in config.rules.iter().enumerate() {
                let Some(global) = &rule.global else {
                    continue;
                };
                let then = match global.failure_mode {
                    FailureMode::Local => {
                        "only this proxy's bucket decides (failureMode \"local\")"
                    }
                    FailureMode::Open => "every request is allowed (failureMode \"open\")",
                    FailureMode::Closed => "every request gets 503 (failureMode \"closed\")",
                };
                let path = f.path(&format!("rules[{i}].global.cluster"));
                let problem = match clusters.find(&global.cluster) {
                    Lookup::Missing => "is not a cluster of static_resources.clusters".to_string(),
                    Lookup::Found(c) if !speaks_http2(c) => format!(
                        "(the cluster at line {}) speaks HTTP/1.1 to its hosts, and the rate limit \
                         service is gRPC, which needs HTTP/2 (typed_extension_protocol_options: \
                         HttpProtocolOptions with explicit_http_config.http2_protocol_options)",
                        yaml::line(c)
                    ),
                    Lookup::Found(_) | Lookup::Unknown => continue,
                };
                out.push(self.finding(
                    f.line_of(&path),
                    Some(f.plugin),
                    path,
                    Severity::Error,
                    format!(
                        "\"{}\" {problem}: no call to the rate limit service succeeds, so {then}",
                        global.cluster
                    ),
                ));
            }
        }
    }

    /// A route matching an `x-route-*` value that no variant of the flag behind that header
    /// produces can never be taken.
    fn route_values(&self, out: &mut Vec<Finding>) {
        let routers: Vec<(&Filter, &flag_router::config::Config)> = self
            .ours
            .iter()
            .filter_map(|f| match &f.config {
                Ok(Parsed::FlagRouter(c)) => Some((f, c)),
                _ => None,
            })
            .collect();
        if routers.is_empty() {
            return;
        }
        let hosts = yaml::items(yaml::path(self.manager, &["route_config", "virtual_hosts"]));
        for route in hosts
            .iter()
            .flat_map(|h| yaml::items(yaml::get(h, "routes")))
        {
            for matcher in yaml::items(yaml::path(route, &["match", "headers"])) {
                let Some(header) = yaml::str_at(matcher, &["name"]) else {
                    continue;
                };
                let header = header.to_ascii_lowercase();
                let Some(test) = ValueTest::read(matcher) else {
                    continue;
                };
                let set_by = routers.iter().find_map(|(f, c)| {
                    c.headers
                        .iter()
                        .find(|(_, h)| *h == header)
                        .map(|(flag, _)| (*f, *c, flag.as_str()))
                });
                let Some((f, config, flag)) = set_by else {
                    if header.starts_with("x-route-") {
                        out.push(self.finding(
                            test.line,
                            None,
                            format!("route match header {header}"),
                            Severity::Warning,
                            format!(
                                "no flag router `headers` entry sets {header}: the flag router \
                                 removes only the headers it sets, so only a client's own \
                                 {header} can take this route"
                            ),
                        ));
                    }
                    continue;
                };
                // Flags fetched from a source are not known here: only inline ones are linted.
                let Some(definition) = config.flags.flags.get(flag) else {
                    continue;
                };
                if definition.variants.values().any(|v| test.matches(v)) {
                    continue;
                }
                let variants: Vec<String> = definition
                    .variants
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect();
                out.push(self.finding(
                    test.line,
                    Some(f.plugin),
                    f.path(&format!("flags.{flag}.variants")),
                    Severity::Warning,
                    format!(
                        "the route matches {header} {} \"{}\", which no variant of flag \
                         \"{flag}\" produces (its variants: {}): the route is never taken{}",
                        test.how,
                        test.value,
                        variants.join(", "),
                        if config.source.is_some() {
                            " (unless the fetched flag document defines other variants)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }
    }

    /// The README's order, rate limit → flag router → idempotency → cached fallback; each
    /// pair the other way round has a documented consequence.
    fn order(&self, out: &mut Vec<Finding>) {
        for (i, early) in self.ours.iter().enumerate() {
            for late in self.ours.iter().skip(i + 1) {
                // The stages of one edge.wasm filter run in the README's order.
                if early.plugin <= late.plugin || early.index == late.index {
                    continue;
                }
                out.push(self.finding(
                    early.line,
                    Some(early.plugin),
                    format!("http_filters[{}]", early.index),
                    Severity::Warning,
                    format!(
                        "{} (line {}) runs before {} (line {}), against the README's order \
                         (rate_limit, flag_router, idempotency, cached_fallback): {}",
                        early.plugin.name(),
                        early.line,
                        late.plugin.name(),
                        late.line,
                        consequence(late.plugin, early.plugin)
                    ),
                ));
            }
        }
    }
}

/// What goes wrong when `first` (earlier in the README's order) runs after `second`.
fn consequence(first: Plugin, second: Plugin) -> &'static str {
    use Plugin::*;
    match (first, second) {
        (RateLimit, FlagRouter) => {
            "flags are evaluated for requests the rate limiter then refuses, which the README's \
             order refuses before any other work"
        }
        (RateLimit, Idempotency) => {
            "replays and 409s are answered before the rate limiter counts them, so repeating a \
             key uses no quota, and a limited request first claims its key \
             (envoy/scenarios/chain-02-rate-limit-429-not-kept-by-idempotency.yaml, \
             chain-03-rate-limit-first-counts-replays.yaml)"
        }
        (RateLimit, CachedFallback) => {
            "while its circuit is open cached_fallback answers before the rate limiter counts \
             the request, so those requests use no quota \
             (envoy/scenarios/chain-01-rate-limit-429-not-replaced-by-fallback.yaml)"
        }
        (FlagRouter, Idempotency) => {
            "idempotency answers replays and 409s before any flag is evaluated, and sees the \
             client's own x-route-* headers, which the flag router has not yet removed"
        }
        (FlagRouter, CachedFallback) => {
            "cached_fallback keys and serves its kept answers before the flag router has set \
             the x-route-* headers, so a failure can serve one variant's kept answer to the \
             other variant's users \
             (envoy/scenarios/chain-05-fallback-keyed-by-flag-variant.yaml)"
        }
        (Idempotency, CachedFallback) => {
            "an upstream failure reaches idempotency's response callbacks before \
             cached_fallback's, the other way round from the README's request path, and \
             cached_fallback sees idempotency's replies (a replay is a local reply, which it \
             does not keep: envoy/scenarios/chain-06-replay-not-kept-by-fallback.yaml)"
        }
        _ => "the plugins then see each other's answers in an order none of them documents",
    }
}

/// How a route's header matcher compares a value.
#[derive(Clone, Copy)]
enum Compare {
    Exact,
    Prefix,
    Suffix,
    Contains,
}

impl Compare {
    /// Its `string_match` field, its older field of its own, and how a message says it.
    const ALL: [(Compare, &'static str, &'static str, &'static str); 4] = [
        (Compare::Exact, "exact", "exact_match", "exactly"),
        (Compare::Prefix, "prefix", "prefix_match", "by prefix"),
        (Compare::Suffix, "suffix", "suffix_match", "by suffix"),
        (
            Compare::Contains,
            "contains",
            "contains_match",
            "containing",
        ),
    ];
}

/// A route's header matcher on a value.
struct ValueTest {
    compare: Compare,
    how: &'static str,
    value: String,
    ignore_case: bool,
    line: usize,
}

impl ValueTest {
    /// `None` for matchers that say nothing about one value (presence, regex, range,
    /// inverted).
    fn read(matcher: &Node<'_>) -> Option<ValueTest> {
        if yaml::get(matcher, "invert_match").and_then(|n| n.data.as_bool()) == Some(true) {
            return None;
        }
        let string_match = yaml::get(matcher, "string_match");
        Compare::ALL
            .iter()
            .find_map(|&(compare, field, legacy, how)| {
                let (node, ignore_case) = match string_match {
                    Some(m) => (
                        yaml::get(m, field)?,
                        yaml::get(m, "ignore_case").and_then(|n| n.data.as_bool()) == Some(true),
                    ),
                    None => (yaml::get(matcher, legacy)?, false),
                };
                Some(ValueTest {
                    compare,
                    how,
                    value: yaml::text(node)?,
                    ignore_case,
                    line: yaml::line(node),
                })
            })
    }

    fn matches(&self, value: &str) -> bool {
        let (v, want) = if self.ignore_case {
            (value.to_lowercase(), self.value.to_lowercase())
        } else {
            (value.to_string(), self.value.clone())
        };
        match self.compare {
            Compare::Exact => v == want,
            Compare::Prefix => v.starts_with(&want),
            Compare::Suffix => v.ends_with(&want),
            Compare::Contains => v.contains(&want),
        }
    }
}
