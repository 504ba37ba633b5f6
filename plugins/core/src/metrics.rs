//! The counters a plugin keeps, named once. Each plugin declares one enum of its counters and
//! their names ([`Counter`]); edge-host's `Counters` defines them at configure time and counts
//! by variant, so a name is written in one place and a counter cannot be misspelt at the
//! increment. Names are what Envoy shows (`wasmcustom.<prefix>.<name>`) and tests read.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
/// A plugin's counters: one variant each.
pub trait Counter: Copy + PartialEq + 'static {
    /// Every counter, in the order they are defined.
    const ALL: &'static [Self];

    /// Its name under the prefix it is defined with: `stored` counts as
    /// `cached_fallback.stored`.
    fn name(self) -> &'static str;
}

/// The full names of `C`'s counters, `<prefix>.<name>`, one set per prefix in turn (a plugin
/// that counts per rule defines one set per rule); [`index`] counts in this order.
pub fn names<C: Counter>(prefixes: &[impl AsRef<str>]) -> Vec<String> {
    let own: Vec<&str> = C::ALL.iter().map(|c| c.name()).collect();
    let prefixes: Vec<&str> = prefixes.iter().map(AsRef::as_ref).collect();
    full_names(&prefixes, &own)
}

/// Every `<prefix>.<name>`. Not inlined: with the names known at compile time the loop would
/// be unrolled into one `format!` per counter in every module.
#[inline(never)]
fn full_names(prefixes: &[&str], names: &[&str]) -> Vec<String> {
    let mut out = Vec::with_capacity(prefixes.len() * names.len());
    for p in prefixes {
        for n in names {
            out.push(format!("{p}.{n}"));
        }
    }
    out
}

/// Where counter `c` of set `set` is in [`names`].
pub fn index<C: Counter>(set: usize, c: C) -> usize {
    let at = C::ALL.iter().position(|x| *x == c).unwrap_or(0);
    set * C::ALL.len() + at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Seen {
        Hit,
        Miss,
    }

    impl Counter for Seen {
        const ALL: &'static [Seen] = &[Seen::Hit, Seen::Miss];
        fn name(self) -> &'static str {
            match self {
                Seen::Hit => "hit",
                Seen::Miss => "miss",
            }
        }
    }

    #[test]
    fn each_set_names_every_counter_under_its_prefix() {
        let names = names::<Seen>(&["p.a", "p.b"]);
        assert_eq!(names, ["p.a.hit", "p.a.miss", "p.b.hit", "p.b.miss"]);
        assert_eq!(names[index(0, Seen::Miss)], "p.a.miss");
        assert_eq!(names[index(1, Seen::Hit)], "p.b.hit");
    }
}
