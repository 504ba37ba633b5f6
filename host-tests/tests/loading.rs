//! Loading modules the way Envoy does: start, configure, refuse what Envoy refuses.
mod common;
use common::*;
use host_tests::{Edge, Module, Plugin};

#[test]
fn probe_starts_and_configures_with_vm_and_plugin_configuration() -> anyhow::Result<()> {
    let edge = Edge::builder()
        .plugin(
            Plugin::new(&probe(), "x=1")
                .vm_config("vm-cfg")
                .env("PROBE_ENV", "from-env"),
        )
        .build()?;
    assert!(
        edge.logged("probe stdout vm_config=vm-cfg"),
        "WASI stdout reaches the log"
    );
    assert!(
        edge.logged("env=from-env"),
        "environment comes from the VM config"
    );
    assert!(edge.logged("configured with \"x=1\""));
    let stderr = edge
        .logs()
        .into_iter()
        .find(|l| l.message == "probe stderr")
        .unwrap();
    assert_eq!(
        stderr.level,
        host_tests::abi::LogLevel::Error,
        "stderr logs at error"
    );
    Ok(())
}

#[test]
fn rejected_configuration_is_a_load_error_with_the_plugins_reason() {
    let err = probe_edge("reject")
        .build()
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("rejected its configuration"), "{err}");
    assert!(err.contains("`mode` must be one of a, b"), "{err}");
}

#[test]
fn trap_during_configure_is_a_load_error() {
    let err = probe_edge("trap")
        .build()
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("trapped"), "{err}");
}

#[test]
fn module_importing_an_unknown_hostcall_fails_naming_it() {
    let err = wat("unknown_import").err().expect("must fail").to_string();
    assert!(err.contains("proxy_teleport"), "{err}");
}

#[test]
fn module_without_an_abi_version_is_refused() {
    let err = wat("no_abi").err().expect("must fail").to_string();
    assert!(err.contains("proxy_abi_version_0_2_1"), "{err}");
}

#[test]
fn missing_module_file_says_how_to_build_it() {
    let err = Module::from_file("/nonexistent/x.wasm")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("run ./build.sh"), "{err}");
}

#[test]
fn randomness_and_clock_are_controlled_by_the_test() -> anyhow::Result<()> {
    let random_line = |seed: u64| -> anyhow::Result<String> {
        let edge = probe_edge("")
            .seed(seed)
            .start_time_ns(1_800_000_000_000_000_000)
            .build()?;
        Ok(lines(&edge, "vm started").remove(0))
    };
    let a = random_line(7)?;
    assert_eq!(a, random_line(7)?, "same seed, same randomness");
    assert_ne!(a, random_line(8)?, "other seed, other randomness");
    assert!(a.contains("unix=1800000000"), "{a}");
    Ok(())
}
