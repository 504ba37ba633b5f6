//! The module's side of the ABI's callbacks: which context a callback is for, and which
//! context made each callout. The SDK's dispatcher did this with seeded hash maps, up to three
//! looked up per callback (240 wasm instructions for a callback that does nothing), and kept
//! its contexts as trait objects of its own traits, whose vtables hold every hostcall wrapper
//! of the SDK once per context type. Here each callback is one lookup in a map keyed by the id
//! itself, and the contexts implement the few callbacks below.
//!
//! Nothing here traps: a callback for a context this module does not know (the host's
//! mistake, or a context whose creation failed) does nothing and lets the stream go on.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::hash::{BuildHasherDefault, Hasher};
use hashbrown::HashMap;

/// What a stream callback tells the host: go on, or hold the stream until a resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

/// A host status that refused a call (the ABI's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}

impl Status {
    /// A non-OK status as the host returned it; a number the ABI does not define reads as an
    /// internal failure.
    pub fn from_raw(raw: u32) -> Status {
        match raw {
            1 => Status::NotFound,
            2 => Status::BadArgument,
            3 => Status::SerializationFailure,
            4 => Status::ParseFailure,
            7 => Status::Empty,
            8 => Status::CasMismatch,
            12 => Status::Unimplemented,
            _ => Status::InternalFailure,
        }
    }
}

/// The answers to callouts, for whichever context made them.
pub trait Context {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
    }
    fn on_grpc_call_response(&mut self, _token: u32, _status: u32, _size: usize) {}
}

/// A plugin instance: its configuration, its timer, and the streams it filters.
pub trait RootContext: Context {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        true
    }
    fn on_configure(&mut self, _size: usize) -> bool {
        true
    }
    fn on_tick(&mut self) {}
    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>>;
}

/// One HTTP stream's callbacks.
pub trait HttpContext: Context {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
    fn on_http_request_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
    fn on_http_response_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        Action::Continue
    }
    fn on_log(&mut self) {}
}

/// Builds the root context for a root id the host creates.
pub type NewRoot = fn(u32) -> Box<dyn RootContext>;

/// Context ids are small distinct integers the host hands out: multiplied by an odd
/// constant, every bit of the id reaches the hash's top bits, which the map's groups use.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type ById<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Grpc,
}

struct Registry {
    new_root: Cell<Option<NewRoot>>,
    roots: RefCell<Vec<(u32, Box<dyn RootContext>)>>,
    /// Each stream with the number of its callouts in flight.
    streams: RefCell<ById<(Box<dyn HttpContext>, u32)>>,
    /// Callouts in flight by token (unique within a VM whatever their kind): their kind and
    /// the context that made it. The host delivers every answer, to a deleted stream's too
    /// (it cancels callouts only when the root goes), so an entry leaves when its answer
    /// arrives or, if its context is deleted first, then.
    callouts: RefCell<ById<(Kind, u32)>>,
    /// The context whose code runs: a callout started now is that context's.
    active: Cell<u32>,
    /// Callouts the running stream callback started, added to the stream's count after it:
    /// a stream that made none (nearly every one) is deleted without a walk of the callouts.
    started: Cell<u32>,
}

crate::local::vm_local! {
    static VM: Registry = const {
        Registry {
            new_root: Cell::new(None),
            roots: RefCell::new(Vec::new()),
            streams: RefCell::new(HashMap::with_hasher(BuildHasherDefault::new())),
            callouts: RefCell::new(HashMap::with_hasher(BuildHasherDefault::new())),
            active: Cell::new(0),
            started: Cell::new(0),
        }
    };
}

/// Sets how root contexts are made; called once, when the VM starts.
pub fn set_root(new: NewRoot) {
    VM.with(|vm| vm.new_root.set(Some(new)));
}

pub fn create(id: u32, root_id: u32) {
    VM.with(|vm| {
        // Plugin code runs below (a constructor): what it starts is this context's.
        vm.active.set(id);
        vm.started.set(0);
        if root_id == 0 {
            if let Some(new) = vm.new_root.get() {
                let root = new(id);
                if let Ok(mut roots) = vm.roots.try_borrow_mut() {
                    roots.push((id, root));
                }
            }
            return;
        }
        let stream = match vm.roots.try_borrow() {
            Ok(roots) => roots
                .iter()
                .find(|(r, _)| *r == root_id)
                .and_then(|(_, root)| root.create_http_context(id)),
            Err(_) => None,
        };
        if let (Some(stream), Ok(mut streams)) = (stream, vm.streams.try_borrow_mut()) {
            streams.insert(id, (stream, vm.started.replace(0)));
        }
    });
}

/// Runs `f` on root context `id`; `None` when there is none (or it is already running).
pub fn with_root<R>(id: u32, f: impl FnOnce(&mut dyn RootContext) -> R) -> Option<R> {
    VM.with(|vm| {
        let mut roots = vm.roots.try_borrow_mut().ok()?;
        let (_, root) = roots.iter_mut().find(|(r, _)| *r == id)?;
        vm.active.set(id);
        Some(f(root.as_mut()))
    })
}

/// Runs `f` on stream context `id`; `None` when there is none (or it is already running).
pub fn with_stream<R>(id: u32, f: impl FnOnce(&mut dyn HttpContext) -> R) -> Option<R> {
    VM.with(|vm| {
        let mut streams = vm.streams.try_borrow_mut().ok()?;
        let (stream, calls) = streams.get_mut(&id)?;
        vm.active.set(id);
        vm.started.set(0);
        let r = f(stream.as_mut());
        *calls = calls.saturating_add(vm.started.replace(0));
        Some(r)
    })
}

/// A stream callback's answer to the host; an unknown stream goes on.
pub fn stream_action(id: u32, f: impl FnOnce(&mut dyn HttpContext) -> Action) -> u32 {
    with_stream(id, f).unwrap_or(Action::Continue) as u32
}

pub fn delete(id: u32) {
    VM.with(|vm| {
        let stream = vm
            .streams
            .try_borrow_mut()
            .ok()
            .and_then(|mut s| s.remove(&id));
        let root = match (&stream, vm.roots.try_borrow_mut()) {
            (None, Ok(mut roots)) => roots
                .iter()
                .position(|(r, _)| *r == id)
                .map(|at| roots.swap_remove(at)),
            _ => None,
        };
        // A root's callouts are walked always: roots are few and rarely deleted.
        let made_calls = stream.as_ref().is_none_or(|(_, n)| *n > 0);
        if made_calls {
            if let Ok(mut calls) = vm.callouts.try_borrow_mut() {
                calls.retain(|_, (_, owner)| *owner != id);
            }
        }
        // The context is dropped here, outside every borrow, as the running one: its
        // destructor may start a callout, and must not find the registry held.
        vm.active.set(id);
        drop(stream);
        drop(root);
    });
}

/// Records a callout the running context started.
pub(crate) fn started_http(token: u32) {
    started(Kind::Http, token);
}

pub(crate) fn started_grpc(token: u32) {
    started(Kind::Grpc, token);
}

fn started(kind: Kind, token: u32) {
    VM.with(|vm| {
        if let Ok(mut calls) = vm.callouts.try_borrow_mut() {
            calls.insert(token, (kind, vm.active.get()));
            vm.started.set(vm.started.get().saturating_add(1));
        }
    });
}

/// Hands a callout's answer to the context that made it, made effective on the host first
/// (the answer's headers and body are read through it); dropped when that context is gone.
fn answer(kind: Kind, token: u32, f: impl FnOnce(&mut dyn Context)) {
    let owner = VM.with(|vm| {
        let mut calls = vm.callouts.try_borrow_mut().ok()?;
        if calls.get(&token).is_none_or(|(k, _)| *k != kind) {
            return None;
        }
        let (_, owner) = calls.remove(&token)?;
        if let Ok(mut streams) = vm.streams.try_borrow_mut() {
            if let Some((_, n)) = streams.get_mut(&owner) {
                *n = n.saturating_sub(1);
            }
        }
        Some(owner)
    });
    let Some(owner) = owner else {
        return;
    };
    if crate::ffi::set_effective_context(owner) != crate::ffi::OK {
        return;
    }
    let mut f = Some(f);
    let delivered = with_stream(owner, |s| {
        if let Some(f) = f.take() {
            f(as_context(s));
        }
    });
    if delivered.is_none() {
        if let Some(f) = f.take() {
            with_root(owner, |r| f(as_root_context(r)));
        }
    }
}

fn as_context(s: &mut dyn HttpContext) -> &mut dyn Context {
    s
}

fn as_root_context(r: &mut dyn RootContext) -> &mut dyn Context {
    r
}

pub fn http_call_response(token: u32, headers: usize, body: usize, trailers: usize) {
    answer(Kind::Http, token, |c| {
        c.on_http_call_response(token, headers, body, trailers)
    });
}

/// A unary gRPC call's message (status 0, OK).
pub fn grpc_receive(token: u32, size: usize) {
    answer(Kind::Grpc, token, |c| {
        c.on_grpc_call_response(token, 0, size)
    });
}

/// A unary gRPC call's failure.
pub fn grpc_close(token: u32, status: u32) {
    answer(Kind::Grpc, token, |c| {
        c.on_grpc_call_response(token, status, 0)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::rc::Rc;
    use alloc::string::String;

    /// What the contexts saw, in order.
    type Seen = Rc<RefCell<Vec<String>>>;

    std::thread_local! {
        static SEEN: Seen = Seen::default();
    }

    fn saw(line: String) {
        SEEN.with(|s| s.borrow_mut().push(line));
    }

    fn seen() -> Vec<String> {
        SEEN.with(|s| core::mem::take(&mut *s.borrow_mut()))
    }

    struct Root(u32);
    struct Stream(u32);

    impl Context for Root {
        fn on_http_call_response(&mut self, token: u32, _: usize, body: usize, _: usize) {
            saw(format!("root {} answer {token} ({body} bytes)", self.0));
        }
    }
    impl RootContext for Root {
        fn on_configure(&mut self, size: usize) -> bool {
            saw(format!("root {} configure {size}", self.0));
            started_http(100 + self.0);
            size > 0
        }
        fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Stream(id)))
        }
    }
    impl Context for Stream {
        fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
            saw(format!(
                "stream {} grpc {token} status {status} size {size}",
                self.0
            ));
        }
    }
    impl HttpContext for Stream {
        fn on_http_request_headers(&mut self, n: usize, _: bool) -> Action {
            saw(format!("stream {} headers {n}", self.0));
            started_grpc(200 + self.0);
            Action::Pause
        }
    }

    fn registry_size() -> (usize, usize, usize) {
        VM.with(|vm| {
            (
                vm.roots.borrow().len(),
                vm.streams.borrow().len(),
                vm.callouts.borrow().len(),
            )
        })
    }

    #[test]
    fn callbacks_reach_their_context_and_answers_the_caller() {
        set_root(|id| Box::new(Root(id)));
        create(1, 0);
        assert_eq!(with_root(1, |r| r.on_configure(7)), Some(true));
        create(2, 1);
        create(3, 1);
        assert_eq!(stream_action(3, |s| s.on_http_request_headers(4, false)), 1);
        assert_eq!(stream_action(2, |s| s.on_http_response_body(1, true)), 0);
        // An unknown stream goes on; a stream of an unknown root is never made.
        assert_eq!(stream_action(9, |s| s.on_http_request_headers(1, false)), 0);
        create(4, 8);
        assert_eq!(registry_size(), (1, 2, 2));
        grpc_receive(203, 12);
        grpc_receive(203, 12);
        grpc_close(203, 14);
        http_call_response(101, 0, 5, 0);
        assert_eq!(
            seen(),
            [
                "root 1 configure 7",
                "stream 3 headers 4",
                "stream 3 grpc 203 status 0 size 12",
                "root 1 answer 101 (5 bytes)",
            ]
        );
        assert_eq!(registry_size(), (1, 2, 0));
    }

    #[test]
    fn a_deleted_stream_takes_its_callouts_with_it() {
        set_root(|id| Box::new(Root(id)));
        create(1, 0);
        for id in 2..1002 {
            create(id, 1);
            stream_action(id, |s| s.on_http_request_headers(0, true));
            delete(id);
        }
        assert_eq!(registry_size(), (1, 0, 0));
        grpc_close(205, 14);
        assert_eq!(seen().len(), 1000, "only the header callbacks ran");
        delete(1);
        assert_eq!(registry_size(), (0, 0, 0));
        assert_eq!(with_root(1, |r| r.on_configure(1)), None);
    }

    #[test]
    fn ids_hash_apart() {
        use std::hash::BuildHasher;
        let b = BuildHasherDefault::<IdHasher>::new();
        // The map's 7-bit group tag is the top of the hash as a `usize`: bits 57-63 natively,
        // 25-31 on wasm32, where the modules run.
        let native: std::collections::HashSet<u64> =
            (1u32..=128).map(|id| b.hash_one(id) >> 57).collect();
        let wasm32: std::collections::HashSet<u64> = (1u32..=128)
            .map(|id| (b.hash_one(id) & 0xffff_ffff) >> 25)
            .collect();
        assert!(native.len() > 64, "{} distinct tags natively", native.len());
        assert!(
            wasm32.len() > 64,
            "{} distinct tags on wasm32",
            wasm32.len()
        );
    }
}
