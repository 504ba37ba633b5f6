//! Metrics: counters, gauges and histograms a plugin defines (Envoy: `wasmcustom.<name>`).

use super::memory::{read_text, write_u32, write_u64, HostcallError};
use crate::abi::{MetricType, Status};
use crate::state::{Metric, VmState};
use wasmtime::{Caller, Linker};

pub(super) fn link(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // § Metrics: a metric by type and name.
    import!(linker, "proxy_define_metric", define_metric(
        metric_type: u32, name_data: u32, name_size: u32, return_metric_id: u32));
    // § Metrics: adds a delta (counters only upwards).
    import!(linker, "proxy_increment_metric", increment_metric(metric_id: u32, delta: i64));
    // § Metrics: records a value (a histogram sample, a gauge's level).
    import!(linker, "proxy_record_metric", record_metric(metric_id: u32, value: u64));
    // § Metrics: a counter's or gauge's value.
    import!(linker, "proxy_get_metric", get_metric(metric_id: u32, return_value: u32));
    Ok(())
}

fn define_metric(
    caller: &mut Caller<'_, VmState>,
    metric_type: u32,
    name_data: u32,
    name_size: u32,
    return_metric_id: u32,
) -> Result<(), HostcallError> {
    let kind = MetricType::from_u32(metric_type).ok_or(Status::BadArgument)?;
    let name = read_text(caller, name_data, name_size)?;
    // Each define gets a new id (type in the low 2 bits) naming the same underlying stat.
    let metric_id = {
        let mut host = caller.data().host.borrow_mut();
        let stat = match host
            .metrics
            .iter()
            .position(|metric| metric.name == name && metric.kind == kind)
        {
            Some(index) => index,
            None => {
                host.metrics.push(Metric {
                    name: name.clone(),
                    kind,
                    value: 0,
                    samples: Vec::new(),
                });
                host.metrics.len() - 1
            }
        };
        let ordinal = host.metric_ids.len() as u32 + 1;
        let metric_id = (ordinal << 2) | metric_type;
        host.metric_ids.insert((name, metric_id), stat as u32);
        metric_id
    };
    write_u32(caller, return_metric_id, metric_id)
}

fn with_metric<T>(
    caller: &mut Caller<'_, VmState>,
    metric_id: u32,
    use_metric: impl FnOnce(&mut Metric) -> Result<T, HostcallError>,
) -> Result<T, HostcallError> {
    let mut host = caller.data().host.borrow_mut();
    let stat = host
        .metric_ids
        .iter()
        .find(|((_, id), _)| *id == metric_id)
        .map(|(_, stat)| *stat as usize)
        .ok_or(Status::NotFound)?;
    let metric = host.metrics.get_mut(stat).ok_or(Status::NotFound)?;
    use_metric(metric)
}

fn increment_metric(
    caller: &mut Caller<'_, VmState>,
    metric_id: u32,
    delta: i64,
) -> Result<(), HostcallError> {
    with_metric(caller, metric_id, |metric| match metric.kind {
        MetricType::Counter if delta > 0 => {
            metric.value = metric.value.wrapping_add(delta as u64);
            Ok(())
        }
        MetricType::Gauge => {
            metric.value = metric.value.saturating_add_signed(delta);
            Ok(())
        }
        _ => Err(Status::BadArgument.into()),
    })
}

fn record_metric(
    caller: &mut Caller<'_, VmState>,
    metric_id: u32,
    value: u64,
) -> Result<(), HostcallError> {
    with_metric(caller, metric_id, |metric| {
        match metric.kind {
            MetricType::Counter => metric.value = metric.value.wrapping_add(value),
            MetricType::Gauge => metric.value = value,
            MetricType::Histogram => metric.samples.push(value),
        }
        Ok(())
    })
}

fn get_metric(
    caller: &mut Caller<'_, VmState>,
    metric_id: u32,
    return_value: u32,
) -> Result<(), HostcallError> {
    let value = with_metric(caller, metric_id, |metric| match metric.kind {
        MetricType::Histogram => Err(Status::BadArgument.into()),
        _ => Ok(metric.value),
    })?;
    write_u64(caller, return_value, value)
}
