//! `edge.wasm` against the separate plugins: every scenario whose chain is made of our plugins
//! runs again with that chain as one `edge.wasm` filter (each plugin's configuration its
//! section), and must give the same transcript as the four-filter chain in the README's order.
//! Where that is the file's own order, the transcript must also meet the file's expectations;
//! the chain-* files that show other orders show what `edge.wasm`, whose order is fixed, never
//! does.
use host_tests::scenario::{files_in, run_in_harness, Modules, Scenario, EDGE_SECTIONS};

fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

#[test]
fn every_chain_of_our_plugins_answers_alike_as_one_filter() -> anyhow::Result<()> {
    let root = workspace();
    let mut modules = Modules::new(root.join("dist"));
    let mut compared = Vec::new();
    let mut problems = Vec::new();
    for file in files_in(root.join("envoy/scenarios"))? {
        let s = Scenario::from_file(&file)?;
        // A refused configuration names its field within the section: checked below.
        let Some(one) = s.as_one_filter().filter(|_| s.load_error.is_none()) else {
            continue;
        };
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some((ordered, moved)) = s.in_readme_order() else {
            continue;
        };
        let chain = run_in_harness(&ordered, &mut modules)?.render();
        let t = run_in_harness(&one, &mut modules)?;
        let wrong = if moved { Vec::new() } else { one.check(&t) };
        if !wrong.is_empty() || t.render() != chain {
            problems.push(format!(
                "{name}: {wrong:?}\n--- chain\n{chain}\n--- edge.wasm\n{}",
                t.render()
            ));
        }
        compared.push(name);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    for prefix in ["chain-", "rl-", "fr-", "id-", "cf-"] {
        assert!(
            compared.iter().any(|n| n.starts_with(prefix)),
            "no {prefix}* scenario ran as one filter: {compared:?}"
        );
    }
    let chains = files_in(root.join("envoy/scenarios"))?
        .iter()
        .filter(|f| f.to_string_lossy().contains("/chain-"))
        .count();
    assert_eq!(
        compared.iter().filter(|n| n.starts_with("chain-")).count(),
        chains,
        "every chain-* scenario runs as one filter"
    );
    Ok(())
}

/// A configuration the plugin refuses is refused by `edge.wasm` with the plugin's own error,
/// its field named within the section.
#[test]
fn each_sections_errors_are_the_plugins_own_under_the_sections_name() -> anyhow::Result<()> {
    let root = workspace();
    let mut modules = Modules::new(root.join("dist"));
    let mut checked = 0;
    for file in files_in(root.join("envoy/scenarios"))? {
        let s = Scenario::from_file(&file)?;
        let (Some(_), Some(mut one)) = (s.load_error.clone(), s.as_one_filter()) else {
            continue;
        };
        // The plugin's own line, as the chain reports it: `<field>: <why>`.
        let chain = run_in_harness(&s, &mut modules)?;
        let refused = chain.refused.clone().unwrap_or_default();
        // `plugin <name> rejected its configuration: <plugin>: configuration rejected: <own>`
        let plugin = refused
            .strip_prefix("plugin ")
            .and_then(|r| r.split(' ').next())
            .unwrap_or_default();
        let (_, section) = EDGE_SECTIONS
            .iter()
            .find(|(p, _)| *p == plugin)
            .ok_or_else(|| anyhow::anyhow!("{}: {refused}", file.display()))?;
        let own = refused
            .split("configuration rejected: ")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let named = match own.strip_prefix("configuration: ") {
            Some(rest) => format!("configuration rejected: {section}: {rest}"),
            None => format!("configuration rejected: {section}.{own}"),
        };
        one.load_error = Some(named.clone());
        let t = run_in_harness(&one, &mut modules)?;
        let wrong = one.check(&t);
        assert!(wrong.is_empty(), "{}: {wrong:?}", file.display());
        checked += 1;
    }
    assert!(
        checked >= 8,
        "only {checked} refused configurations checked"
    );
    Ok(())
}

#[test]
fn a_misspelt_or_malformed_combined_configuration_is_refused_by_name() -> anyhow::Result<()> {
    let mut modules = Modules::new(workspace().join("dist"));
    for (config, want) in [
        (
            r#"{"rateLimits": {"rules": []}}"#,
            "rateLimits: unknown section; the sections are rateLimit, flagRouter, idempotency, cachedFallback",
        ),
        (r#"[]"#, "configuration: must be an object of sections"),
        (
            r#"{"idempotency": {"routes": [{"pathPrefix": "/p"}], "maxEntries": 0}}"#,
            "idempotency.maxEntries:",
        ),
    ] {
        let yaml = format!(
            "about: refused\nchain:\n  - plugin: edge\n    config_text: '{config}'\nload_error: \"{want}\"\n"
        );
        let s: Scenario = serde_yaml::from_str(&yaml)?;
        let t = run_in_harness(&s, &mut modules)?;
        let wrong = s.check(&t);
        assert!(wrong.is_empty(), "{config}: {wrong:?} {}", t.render());
    }
    Ok(())
}
