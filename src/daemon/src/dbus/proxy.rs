//! The client side of `org.dmabroker.Debug1`, for `dmabrokerctl` and the
//! benchmarks. Properties are never cached: they change with every
//! allocation and the daemon does not announce changes.

use super::views::{
    BufferDetail, BufferView, ClientAllocations, ClientView, CloseQueue, HeapView, Statistics,
    Totals,
};

#[zbus::proxy(
    interface = "org.dmabroker.Debug1",
    default_service = "org.dmabroker.Broker1",
    default_path = "/org/dmabroker/Broker1",
    gen_blocking = false
)]
pub trait Debug {
    #[zbus(property(emits_changed_signal = "false"))]
    fn version(&self) -> zbus::Result<String>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn instance(&self) -> zbus::Result<String>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn started_at(&self) -> zbus::Result<u64>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn heaps(&self) -> zbus::Result<Vec<HeapView>>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn totals(&self) -> zbus::Result<Totals>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn silent_ends(&self) -> zbus::Result<u64>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn hand_offs_planned(&self) -> zbus::Result<u64>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn hand_offs(&self) -> zbus::Result<u64>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn cache_syncs_failed(&self) -> zbus::Result<u64>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn cache_ends_running(&self) -> zbus::Result<u64>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn allocations_in_flight(&self) -> zbus::Result<u64>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn allocations_running(&self) -> zbus::Result<u64>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn closes_waiting(&self) -> zbus::Result<u64>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn closing_threads(&self) -> zbus::Result<u64>;

    fn list_clients(&self) -> zbus::Result<Vec<ClientView>>;

    fn list_closes(&self) -> zbus::Result<Vec<CloseQueue>>;

    fn list_allocations_in_flight(&self) -> zbus::Result<Vec<ClientAllocations>>;

    fn list_buffers(&self) -> zbus::Result<Vec<BufferView>>;

    fn get_buffer(&self, id: u64) -> zbus::Result<BufferDetail>;

    fn statistics(&self) -> zbus::Result<Statistics>;

    fn reload_policy(&self) -> zbus::Result<()>;
}
