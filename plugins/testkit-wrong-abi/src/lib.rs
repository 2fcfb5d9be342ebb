//! Announces an ABI version no probe speaks; the host must refuse it before
//! touching anything else (it exports no plugin table at all).

#[no_mangle]
pub extern "C" fn probe_plugin_abi_version() -> u32 {
    999
}
