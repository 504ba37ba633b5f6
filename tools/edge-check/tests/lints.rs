//! The lints on small chains written for the case, through the library.

// A failed assertion, or an unwrap in the functions below, is how a test fails.
#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

use edge_check::{check, Finding, Plugin, Severity};

/// A listener whose `http_filters` are `filters` (one line each, from line 9), with `routes`
/// and `clusters` as flow sequences.
fn envoy(filters: &[String], routes: &str, clusters: &str) -> String {
    let mut y = String::from(
        "static_resources:\n  listeners:\n    - filter_chains:\n        - filters:\n            \
         - name: envoy.filters.network.http_connection_manager\n              typed_config:\n",
    );
    y +=
        &format!("                route_config: {{ virtual_hosts: [ {{ routes: {routes} }} ] }}\n");
    y += "                http_filters:\n";
    for f in filters {
        y += &format!("                  - {f}\n");
    }
    y += &format!("  clusters: {clusters}\n");
    y
}

fn wasm(file: &str, root_id: &str, json: &str) -> String {
    format!(
        "{{ name: envoy.filters.http.wasm, typed_config: {{ config: {{ root_id: {root_id}, \
         vm_config: {{ code: {{ local: {{ filename: {file} }} }} }}, configuration: {{ value: '{json}' }} }} }} }}"
    )
}

fn ours(plugin: &str, json: &str) -> String {
    wasm(&format!("dist/{plugin}.wasm"), plugin, json)
}

fn buffer(bytes: u64) -> String {
    format!("{{ name: envoy.filters.http.buffer, typed_config: {{ max_request_bytes: {bytes} }} }}")
}

const RATE: &str = r#"{"rules":[{"name":"a","limit":{"requests":1,"window":"1s"}}]}"#;
const FLAGS: &str = r#"{"headers":{"f":"x-route-f"},"flags":{"f":{"state":"ENABLED","variants":{"on":"new","off":"old"},"defaultVariant":"off"}}}"#;

fn findings(filters: &[String], routes: &str) -> Vec<Finding> {
    check("t.yaml", &envoy(filters, routes, "[ { name: backend } ]")).unwrap()
}

#[test]
fn the_readme_order_with_a_buffer_is_clean() {
    let chain = [
        ours("rate_limit", RATE),
        ours("flag_router", FLAGS),
        ours("idempotency", "{}"),
        buffer(1 << 20),
        ours("cached_fallback", "{}"),
    ];
    assert_eq!(findings(&chain, "[]"), []);
}

#[test]
fn each_pair_out_of_order_is_one_finding_with_its_consequence() {
    let chain = [
        ours("cached_fallback", "{}"),
        ours("flag_router", FLAGS),
        ours("rate_limit", RATE),
    ];
    let found = findings(&chain, "[]");
    let said: Vec<(usize, Option<Plugin>, &str)> = found
        .iter()
        .map(|f| (f.line, f.plugin, f.path.as_str()))
        .collect();
    assert_eq!(
        said,
        [
            (9, Some(Plugin::CachedFallback), "http_filters[0]"),
            (9, Some(Plugin::CachedFallback), "http_filters[0]"),
            (10, Some(Plugin::FlagRouter), "http_filters[1]"),
        ]
    );
    assert!(found.iter().all(|f| f.severity == Severity::Warning));
    assert!(found[0]
        .message
        .contains("chain-05-fallback-keyed-by-flag-variant"));
    assert!(found[1].message.contains("circuit is open"));
    assert!(found[2].message.contains("refuses before any other work"));
}

#[test]
fn a_module_is_ours_by_file_name_or_root_id() {
    let bad = r#"{"rules":[]}"#;
    let chain = [
        wasm("/etc/envoy/rate_limit.wasm", "limiter", bad),
        wasm("/opt/modules/limiter-v2.wasm", "rate_limit", bad),
        wasm("/opt/modules/other.wasm", "other", bad),
    ];
    let found = findings(&chain, "[]");
    let lines: Vec<usize> = found.iter().map(|f| f.line).collect();
    assert_eq!(lines, [9, 10]);
    assert!(found
        .iter()
        .all(|f| f.path == "rules" && f.message.starts_with("must list at least one rule")));
}

#[test]
fn a_filter_without_configuration_is_reported_on_its_line() {
    let chain = [
        buffer(1),
        "{ name: envoy.filters.http.wasm, typed_config: { config: { root_id: idempotency } } }"
            .to_string(),
    ];
    let found = findings(&chain, "[]");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].line, found[0].path.as_str()),
        (10, "configuration")
    );
    assert!(found[0].message.contains("needs a JSON configuration"));
}

#[test]
fn the_buffer_must_hold_idempotencys_default_max_body_bytes() {
    let default = idempotency::config::Config::parse(b"{}")
        .unwrap()
        .max_body_bytes;
    let enough = [ours("idempotency", "{}"), buffer(default)];
    assert_eq!(findings(&enough, "[]"), []);
    let short = [ours("idempotency", "{}"), buffer(default - 1)];
    let found = findings(&short, "[]");
    assert_eq!(found.len(), 1);
    assert!(found[0]
        .message
        .contains(&format!("is below idempotency's maxBodyBytes {default}")));
    // Envoy picks a filter by its type: the name is free.
    let renamed = [
        wasm("dist/idempotency.wasm", "idempotency", "{}")
            .replace("envoy.filters.http.wasm", "payments-keys")
            .replace("typed_config: {", "typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm,"),
        "{ name: hold, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer, max_request_bytes: 10 } }".to_string(),
    ];
    let found = findings(&renamed, "[]");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].message.contains("max_request_bytes 10 is below"));
    // A buffer before the plugin does not count.
    let before = [buffer(default), ours("idempotency", "{}")];
    let found = findings(&before, "[]");
    assert_eq!(found.len(), 1);
    assert!(found[0]
        .message
        .starts_with("no envoy.filters.http.buffer after"));
}

#[test]
fn route_values_are_checked_against_the_variants() {
    let chain = [ours("flag_router", FLAGS)];
    let route = |m: &str| {
        format!("[ {{ match: {{ prefix: /, headers: [ {{ name: x-route-f, {m} }} ] }} }} ]")
    };
    for ok in [
        "string_match: { exact: new }",
        "string_match: { prefix: ne }",
        "string_match: { exact: NEW, ignore_case: true }",
        "exact_match: old",
        "present_match: true",
        "string_match: { exact: nope }, invert_match: true",
    ] {
        assert_eq!(findings(&chain, &route(ok)), [], "{ok}");
    }
    for bad in [
        "string_match: { exact: NEW }",
        "string_match: { suffix: x }",
        "exact_match: v3",
    ] {
        let found = findings(&chain, &route(bad));
        assert_eq!(found.len(), 1, "{bad}");
        assert_eq!(found[0].path, "flags.f.variants");
        assert!(
            found[0].message.contains("(its variants: off=old, on=new)"),
            "{}",
            found[0].message
        );
    }
}

#[test]
fn a_route_on_an_x_route_header_no_flag_sets_is_reported() {
    let chain = [ours("flag_router", FLAGS)];
    let routes = "[ { match: { prefix: /, headers: [ { name: x-route-other, string_match: { exact: a } } ] } } ]";
    let found = findings(&chain, routes);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].plugin, None);
    assert!(found[0]
        .message
        .contains("only a client's own x-route-other"));
    // Without a flag router in the chain there is nothing to compare with.
    assert_eq!(findings(&[ours("rate_limit", RATE)], routes), []);
}

#[test]
fn flag_source_clusters_are_looked_up_unless_clusters_come_from_cds() {
    let with_source = |cluster: &str| {
        ours(
            "flag_router",
            &format!(
                r#"{{"headers":{{"f":"x-route-f"}},"source":{{"cluster":"{cluster}","path":"/flags.json"}}}}"#
            ),
        )
    };
    assert_eq!(findings(&[with_source("backend")], "[]"), []);
    let found = findings(&[with_source("nowhere")], "[]");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].path, "source.cluster");
    let cds = format!(
        "{}dynamic_resources: {{ cds_config: {{ ads: {{}} }} }}\n",
        envoy(&[with_source("nowhere")], "[]", "[]")
    );
    assert_eq!(check("t.yaml", &cds).unwrap(), []);
}

#[test]
fn a_quoted_value_is_reported_on_its_own_line() {
    let chain = [
        buffer(1),
        ours("rate_limit", r#"{"rules": [}"#),
        ours("cached_fallback", r#"{"maxStale": "soon"}"#),
    ];
    let found = findings(&chain, "[]");
    let said: Vec<(usize, &str)> = found.iter().map(|f| (f.line, f.path.as_str())).collect();
    assert_eq!(said, [(10, "configuration"), (11, "maxStale")]);
    assert!(
        found[0]
            .message
            .contains("at line 1 column 12 of the JSON in the `value` at line 10"),
        "{}",
        found[0].message
    );
}

#[test]
fn an_etcd_store_needs_its_cluster() {
    let store = |cluster: &str, mode: &str| {
        [
            ours(
                "idempotency",
                &format!(
                    r#"{{"store":{{"etcd":{{"cluster":"{cluster}","failureMode":"{mode}"}}}}}}"#
                ),
            ),
            buffer(1 << 20),
        ]
    };
    assert_eq!(findings(&store("backend", "closed"), "[]"), []);
    let found = findings(&store("etcd", "closed"), "[]");
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].line, found[0].path.as_str()),
        (9, "store.etcd.cluster")
    );
    assert!(found[0]
        .message
        .ends_with("every keyed request gets 503 (failureMode \"closed\")"));
    let found = findings(&store("etcd", "open"), "[]");
    assert!(found[0].message.contains("a duplicate runs again"));
}

#[test]
fn a_rate_limit_service_needs_its_cluster_over_http2() {
    let rule = |mode: &str| {
        [ours(
            "rate_limit",
            &format!(
                r#"{{"rules":[{{"name":"a","limit":{{"requests":1,"window":"1s"}},"global":{{"cluster":"rls","domain":"edge","failureMode":"{mode}"}}}}]}}"#
            ),
        )]
    };
    let with =
        |clusters: &str, mode: &str| check("t.yaml", &envoy(&rule(mode), "[]", clusters)).unwrap();
    let explicit = "[ { name: rls, typed_extension_protocol_options: { envoy.extensions.upstreams.http.v3.HttpProtocolOptions: { explicit_http_config: { http2_protocol_options: {} } } } } ]";
    assert_eq!(with(explicit, "local"), []);
    let alpn = "[ { name: rls, typed_extension_protocol_options: { h: { auto_config: { http2_protocol_options: {} } } } } ]";
    assert_eq!(with(alpn, "local"), []);

    let found = with("[ { name: rls } ]", "local");
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].line, found[0].path.as_str()),
        (9, "rules[0].global.cluster")
    );
    assert!(
        found[0]
            .message
            .starts_with("\"rls\" (the cluster at line 10) speaks HTTP/1.1"),
        "{}",
        found[0].message
    );
    assert!(found[0]
        .message
        .ends_with("only this proxy's bucket decides (failureMode \"local\")"));

    let found = with("[ { name: backend } ]", "closed");
    assert_eq!(found.len(), 1);
    assert!(found[0]
        .message
        .starts_with("\"rls\" is not a cluster of static_resources.clusters"));
    assert!(found[0]
        .message
        .ends_with("every request gets 503 (failureMode \"closed\")"));
}

fn edge(json: &str) -> String {
    wasm("dist/edge.wasm", "edge", json)
}

#[test]
fn edge_wasm_sections_are_read_by_their_plugins_and_named_in_findings() {
    let clean = format!(
        r#"{{"rateLimit":{RATE},"flagRouter":{FLAGS},"idempotency":{{}},"cachedFallback":{{}}}}"#
    );
    assert_eq!(findings(&[edge(&clean), buffer(1 << 20)], "[]"), []);

    let bad = format!(r#"{{"rateLimit":{RATE},"idempotency":{{"maxEntries":-1}}}}"#);
    let found = findings(&[edge(&bad), buffer(1 << 20)], "[]");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].plugin, Some(Plugin::Idempotency));
    assert_eq!(found[0].path, "idempotency.maxEntries");
    assert_eq!(found[0].severity, Severity::Error);

    let misspelt = findings(&[edge(r#"{"ratelimit":{}}"#)], "[]");
    assert_eq!(misspelt.len(), 1, "{misspelt:?}");
    assert_eq!(
        (misspelt[0].plugin, misspelt[0].path.as_str()),
        (None, "ratelimit")
    );
    assert!(
        misspelt[0].message.contains("unknown section"),
        "{}",
        misspelt[0].message
    );
}

#[test]
fn edge_wasm_gets_the_chain_lints_under_its_section_names_but_no_order_warning() {
    let flags = FLAGS.replacen(
        '{',
        r#"{"source":{"cluster":"nowhere","path":"/f.json"},"#,
        1,
    );
    let config = format!(r#"{{"flagRouter":{flags},"idempotency":{{}}}}"#);
    let found = findings(&[edge(&config)], "[]");
    let paths: Vec<(Option<Plugin>, &str)> =
        found.iter().map(|f| (f.plugin, f.path.as_str())).collect();
    // No buffer after the filter, and a flag source cluster the YAML lacks; the stages' fixed
    // order is never reported.
    assert!(
        paths.contains(&(Some(Plugin::FlagRouter), "flagRouter.source.cluster")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|f| f.plugin == Some(Plugin::Idempotency) && f.message.contains("buffer")),
        "{found:?}"
    );
    assert!(
        found.iter().all(|f| !f.message.contains("README's order")),
        "{found:?}"
    );
}
