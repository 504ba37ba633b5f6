//! target/modules/replay_filter.wasm, the bench's floor: what it does with a table's keys.
mod common;
use anyhow::Result;
use host_tests::{Edge, Plugin, Request};

/// One request that reads a slot of a table and writes it back with a cas, as a plugin does.
fn config(spread: &str) -> String {
    format!(
        r#"{{"traces":{{"only":[{{"callback":"proxy_on_request_headers","returned":0,"calls":[
        {{"op":"get_shared_data","key":"t/s/5","len":10,"status":"ok"}},
        {{"op":"set_shared_data","key":"t/s/5","len":12,"cas":true}}]}}]}}{spread}}}"#
    )
}

fn replay(config: &str) -> Result<Edge> {
    let module = common::plugin_module("replay_filter");
    Edge::builder()
        .plugin(Plugin::new(&module, config).name("replay"))
        .build()
}

/// The keys of `t/s/` and their values' lengths.
fn table(edge: &Edge) -> Vec<(String, usize)> {
    edge.shared_data_sizes("")
        .into_iter()
        .map(|(k, n)| (String::from_utf8_lossy(&k).into_owned(), n))
        .filter(|(k, _)| k.starts_with("t/s/"))
        .collect()
}

#[test]
fn a_spread_key_reaches_the_whole_table_one_slot_per_stream() -> Result<()> {
    let mut edge = replay(&config(r#","spread":{"t/s/":50}"#))?;
    // Configured: every slot written once, with the recorded length.
    let slots = table(&edge);
    assert_eq!(slots.len(), 50, "{slots:?}");
    assert!(slots.iter().all(|(_, n)| *n == 10));
    assert_eq!(edge.shared_keys_numbered("", "t/s/"), 50);
    for _ in 0..40 {
        edge.send(Request::get("/"))?;
    }
    // Each stream wrote one slot it picked: many slots, none outside the table.
    let written: Vec<String> = table(&edge)
        .into_iter()
        .filter(|(_, n)| *n == 12)
        .map(|(k, _)| k)
        .collect();
    assert!(written.len() > 10, "streams reached {written:?}");
    assert_eq!(table(&edge).len(), 50);
    Ok(())
}

#[test]
fn without_a_spread_the_recorded_key_is_the_only_one() -> Result<()> {
    let mut edge = replay(&config(""))?;
    for _ in 0..10 {
        edge.send(Request::get("/"))?;
    }
    assert_eq!(table(&edge), vec![("t/s/5".to_string(), 12)]);
    Ok(())
}
