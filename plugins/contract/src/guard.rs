//! The one way probe turns a panic into an error message.
//!
//! Host functions a plugin calls, the plugin entry points the SDK exports,
//! and library code that panics on hostile input (the `tokenizers` crate on
//! some malformed `tokenizer.json`) all run under [`catch`]: the panic
//! becomes `Err(message)`, and the process's panic hook stays silent while
//! it is caught, so the user sees one line, not a "thread … panicked" one.
//! Each cdylib has its own std and so its own hook: a plugin installs
//! [`install_quiet_hook`] for itself (the SDK does).

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Inside [`catch`] on this thread.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// Where the last caught panic happened.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Wrap the current panic hook so it stays silent inside [`catch`] (and
/// records where the panic happened); panics anywhere else still reach it.
pub fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let location = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                LOCATION.with(|slot| *slot.borrow_mut() = location);
            } else {
                previous(info);
            }
        }));
    });
}

/// Run `body`; a panic inside becomes `Err` with its message and, when the
/// quiet hook saw it, where it happened.
pub fn catch<T>(body: impl FnOnce() -> T) -> Result<T, String> {
    install_quiet_hook();
    let was = GUARDED.with(|g| g.replace(true));
    let outcome = catch_unwind(AssertUnwindSafe(body));
    GUARDED.with(|g| g.set(was));
    outcome.map_err(|payload| {
        let text = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into());
        match LOCATION.with(|slot| slot.borrow_mut().take()) {
            Some(location) => format!("{text} (at {location})"),
            None => text,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_place() {
        let err = catch(|| -> u32 { panic!("bad {}", 7) }).unwrap_err();
        assert!(err.starts_with("bad 7 (at "), "{err}");
        assert!(err.contains("guard.rs"), "{err}");
        assert_eq!(catch(|| 5).unwrap(), 5);
    }
}
