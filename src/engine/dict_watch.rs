//! Which module dicts a session changed, so `reset()` restores only those.
//!
//! `helper.reset()` used to compare every module dict of the warm snapshot
//! with its copy: ~90 dicts, ~300 µs per reset, about half of a reset's cost,
//! and the pool thread's resets are what 1,000 short sessions wait for (W7).
//! CPython's dict watchers (3.12+) call us on every change to a watched dict:
//! `watch_dicts(dicts)` watches the snapshot's dicts, the callback records the
//! changed ones by address, and `changed_dicts(dicts)` returns the indices of
//! those that changed since the last call (and forgets them).
//!
//! The record is one process-wide set of addresses: a dict's address is unique
//! while it lives, and a watched dict's deallocation removes it. Its lock is
//! taken only when a watched dict changes (a module attribute is set), which
//! atoms rarely do.

use std::cell::UnsafeCell;
use std::collections::HashSet;
use std::ffi::c_int;
use std::ptr;
use std::sync::{Mutex, MutexGuard};

use pyo3::ffi;

use super::python::{take_error, MethodDef, PyRef};

/// `PyDict_WatchEvent`'s `PyDict_EVENT_DEALLOCATED` (3.12 and 3.13).
const EVENT_DEALLOCATED: c_int = 5;

type WatchCallback = unsafe extern "C" fn(
    event: c_int,
    dict: *mut ffi::PyObject,
    key: *mut ffi::PyObject,
    new_value: *mut ffi::PyObject,
) -> c_int;

extern "C" {
    // Not in pyo3-ffi; part of CPython's C API since 3.12.
    fn PyDict_AddWatcher(callback: WatchCallback) -> c_int;
}

static CHANGED: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

fn changed() -> MutexGuard<'static, Option<HashSet<usize>>> {
    CHANGED.lock().unwrap_or_else(|e| e.into_inner())
}

unsafe extern "C" fn on_change(
    event: c_int,
    dict: *mut ffi::PyObject,
    _key: *mut ffi::PyObject,
    _new_value: *mut ffi::PyObject,
) -> c_int {
    let mut set = changed();
    let set = set.get_or_insert_with(HashSet::new);
    if event == EVENT_DEALLOCATED {
        set.remove(&(dict as usize));
    } else {
        set.insert(dict as usize);
    }
    0
}

static WATCH_DEF: MethodDef = MethodDef(UnsafeCell::new(ffi::PyMethodDef {
    ml_name: c"watch_dicts".as_ptr(),
    ml_meth: ffi::PyMethodDefPointer {
        PyCFunction: watch_dicts,
    },
    ml_flags: ffi::METH_O,
    ml_doc: c"watch_dicts(dicts): record every later change to these dicts".as_ptr(),
}));

static CHANGED_DEF: MethodDef = MethodDef(UnsafeCell::new(ffi::PyMethodDef {
    ml_name: c"changed_dicts".as_ptr(),
    ml_meth: ffi::PyMethodDefPointer {
        PyCFunction: changed_dicts,
    },
    ml_flags: ffi::METH_O,
    ml_doc: c"changed_dicts(dicts): indices of those changed since the last call".as_ptr(),
}));

/// The items of `list` (borrowed), or None with a TypeError set.
unsafe fn list_items(list: *mut ffi::PyObject) -> Option<Vec<*mut ffi::PyObject>> {
    unsafe {
        if ffi::PyList_Check(list) == 0 {
            ffi::PyErr_SetString(ffi::PyExc_TypeError, c"a list of dicts".as_ptr());
            return None;
        }
        Some(
            (0..ffi::PyList_Size(list))
                .map(|i| ffi::PyList_GetItem(list, i))
                .collect(),
        )
    }
}

/// `watch_dicts(list)`: registers the callback in this interpreter (watcher
/// ids are per interpreter; call it once) and watches every dict of the list.
unsafe extern "C" fn watch_dicts(
    _slf: *mut ffi::PyObject,
    list: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    unsafe {
        let Some(dicts) = list_items(list) else {
            return ptr::null_mut();
        };
        let id = PyDict_AddWatcher(on_change);
        if id < 0 || dicts.iter().any(|&d| ffi::PyDict_Watch(id, d) < 0) {
            return ptr::null_mut();
        }
        ffi::Py_IncRef(ffi::Py_None());
        ffi::Py_None()
    }
}

/// `changed_dicts(list)`: the indices of the list's dicts that changed since
/// they were last reported, in order; they count as unchanged from now on.
unsafe extern "C" fn changed_dicts(
    _slf: *mut ffi::PyObject,
    list: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    unsafe {
        let Some(dicts) = list_items(list) else {
            return ptr::null_mut();
        };
        let found: Vec<usize> = match changed().as_mut() {
            Some(set) if !set.is_empty() => (0..dicts.len())
                .filter(|&i| set.remove(&(dicts[i] as usize)))
                .collect(),
            _ => Vec::new(),
        };
        let Some(out) = PyRef::new(ffi::PyList_New(0)) else {
            return ptr::null_mut();
        };
        for i in found {
            let Some(n) = PyRef::new(ffi::PyLong_FromSize_t(i)) else {
                return ptr::null_mut();
            };
            if ffi::PyList_Append(out.as_ptr(), n.as_ptr()) < 0 {
                return ptr::null_mut();
            }
        }
        out.into_ptr()
    }
}

/// Puts `watch_dicts` and `changed_dicts` into the helper module's namespace
/// (as `_watch_dicts` and `_changed_dicts`).
/// Needs the interpreter's GIL.
pub(crate) unsafe fn install(helper_dict: *mut ffi::PyObject) -> Result<(), String> {
    unsafe {
        for (name, def) in [
            (c"_watch_dicts", &WATCH_DEF),
            (c"_changed_dicts", &CHANGED_DEF),
        ] {
            let f = PyRef::new(ffi::PyCFunction_New(def.0.get(), ptr::null_mut()))
                .ok_or_else(|| take_error())?;
            if ffi::PyDict_SetItemString(helper_dict, name.as_ptr(), f.as_ptr()) < 0 {
                return Err(take_error());
            }
        }
        Ok(())
    }
}
