//! The shared key-value store and shared queues: what the VMs of one `vm_id` share across
//! workers.

use super::memory::{hand_over, read, read_text, write_u32, HostcallError};
use crate::abi::Status;
use crate::state::{EventKind, Queue, VmState};
use wasmtime::{Caller, Linker};

pub(super) fn link(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // § Shared Key-Value Store: a value and its compare-and-swap number.
    import!(linker, "proxy_get_shared_data", get_shared_data(
        key_data: u32, key_size: u32, return_value_data: u32, return_value_size: u32,
        return_cas: u32));
    // § Shared Key-Value Store: sets a value if cas is 0 or still current.
    import!(linker, "proxy_set_shared_data", set_shared_data(
        key_data: u32, key_size: u32, value_data: u32, value_size: u32, cas: u32));
    // § Shared Queues: creates or opens a queue of this VM's vm_id.
    import!(linker, "proxy_register_shared_queue", register_shared_queue(
        name_data: u32, name_size: u32, return_queue_id: u32));
    // § Shared Queues: finds a queue by vm_id and name.
    import!(linker, "proxy_resolve_shared_queue", resolve_shared_queue(
        vm_id_data: u32, vm_id_size: u32, name_data: u32, name_size: u32, return_queue_id: u32));
    // § Shared Queues: adds an item (the owner gets proxy_on_queue_ready).
    import!(linker, "proxy_enqueue_shared_queue", enqueue_shared_queue(
        queue_id: u32, value_data: u32, value_size: u32));
    // § Shared Queues: takes the oldest item.
    import!(linker, "proxy_dequeue_shared_queue", dequeue_shared_queue(
        queue_id: u32, return_value_data: u32, return_value_size: u32));
    Ok(())
}

fn get_shared_data(
    caller: &mut Caller<'_, VmState>,
    key_data: u32,
    key_size: u32,
    return_value_data: u32,
    return_value_size: u32,
    return_cas: u32,
) -> Result<(), HostcallError> {
    let key = read(caller, key_data, key_size)?;
    if let Some(fault) = caller.data().host.borrow().shared_data_fault {
        return Err(fault.into());
    }
    let found = {
        let state = caller.data();
        let host = state.host.borrow();
        host.shared_data
            .get(&state.plugin.vm_id)
            .and_then(|scope| scope.get(&key))
            .cloned()
    };
    let (value, cas) = found.ok_or(Status::NotFound)?;
    hand_over(caller, &value, return_value_data, return_value_size)?;
    write_u32(caller, return_cas, cas)
}

fn set_shared_data(
    caller: &mut Caller<'_, VmState>,
    key_data: u32,
    key_size: u32,
    value_data: u32,
    value_size: u32,
    cas: u32,
) -> Result<(), HostcallError> {
    let key = read(caller, key_data, key_size)?;
    let value = read(caller, value_data, value_size)?;
    let state = caller.data();
    let mut host = state.host.borrow_mut();
    if let Some(fault) = host.shared_data_fault {
        return Err(fault.into());
    }
    let next = host.take_cas();
    let staged = host.staged_races > 0;
    let scope = host
        .shared_data
        .entry(state.plugin.vm_id.clone())
        .or_default();
    match scope.get_mut(&key) {
        // A stale cas on an existing key loses; a new key accepts any cas (Envoy's rule).
        Some(entry) => {
            if cas != 0 && cas != entry.1 {
                return Err(Status::CasMismatch.into());
            }
            if cas != 0 && staged {
                // Another worker wrote the very same update first; this write loses.
                *entry = (value, next);
                host.staged_races -= 1;
                host.races_run += 1;
                return Err(Status::CasMismatch.into());
            }
            *entry = (value, next);
        }
        None => {
            scope.insert(key, (value, next));
            if cas != 0 && staged {
                // Another worker created the key with the very same value first.
                host.staged_races -= 1;
                host.races_run += 1;
                return Err(Status::CasMismatch.into());
            }
        }
    }
    Ok(())
}

fn register_shared_queue(
    caller: &mut Caller<'_, VmState>,
    name_data: u32,
    name_size: u32,
    return_queue_id: u32,
) -> Result<(), HostcallError> {
    let name = read_text(caller, name_data, name_size)?;
    let state = caller.data();
    // A stream context registers on behalf of its root: notifications go to the root.
    let owner = (state.me, state.root_context);
    let queue_id = {
        let mut host = state.host.borrow_mut();
        let vm_id = state.plugin.vm_id.clone();
        match host
            .queues
            .iter()
            .position(|queue| queue.vm_id == vm_id && queue.name == name)
        {
            Some(index) => {
                if let Some(queue) = host.queues.get_mut(index) {
                    queue.owner = owner;
                }
                index as u32 + 1
            }
            None => {
                host.queues.push(Queue {
                    vm_id,
                    name,
                    owner,
                    items: Default::default(),
                });
                host.queues.len() as u32
            }
        }
    };
    write_u32(caller, return_queue_id, queue_id)
}

fn resolve_shared_queue(
    caller: &mut Caller<'_, VmState>,
    vm_id_data: u32,
    vm_id_size: u32,
    name_data: u32,
    name_size: u32,
    return_queue_id: u32,
) -> Result<(), HostcallError> {
    let vm_id = read_text(caller, vm_id_data, vm_id_size)?;
    let name = read_text(caller, name_data, name_size)?;
    let queue_id = {
        let host = caller.data().host.borrow();
        host.queues
            .iter()
            .position(|queue| queue.vm_id == vm_id && queue.name == name)
            .ok_or(Status::NotFound)? as u32
            + 1
    };
    write_u32(caller, return_queue_id, queue_id)
}

fn enqueue_shared_queue(
    caller: &mut Caller<'_, VmState>,
    queue_id: u32,
    value_data: u32,
    value_size: u32,
) -> Result<(), HostcallError> {
    let value = read(caller, value_data, value_size)?;
    let mut host = caller.data().host.borrow_mut();
    let queue = host
        .queues
        .get_mut((queue_id as usize).wrapping_sub(1))
        .ok_or(Status::NotFound)?;
    queue.items.push_back(value);
    let owner = queue.owner;
    host.schedule(0, owner, EventKind::QueueReady { queue: queue_id });
    Ok(())
}

fn dequeue_shared_queue(
    caller: &mut Caller<'_, VmState>,
    queue_id: u32,
    return_value_data: u32,
    return_value_size: u32,
) -> Result<(), HostcallError> {
    let item = {
        let mut host = caller.data().host.borrow_mut();
        let queue = host
            .queues
            .get_mut((queue_id as usize).wrapping_sub(1))
            .ok_or(Status::NotFound)?;
        queue.items.pop_front().ok_or(Status::Empty)?
    };
    hand_over(caller, &item, return_value_data, return_value_size)
}
