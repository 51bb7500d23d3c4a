//! Start-up of CPython: a PEP 587 configuration, then `sys.path`.

use std::ffi::{c_char, CStr, CString};
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyList;

use super::PythonError;

/// Initializes the interpreter unless this process already did, and releases the GIL.
///
/// The executable is `python` (the `--python` flag), else `$VIRTUAL_ENV/bin/python`, else
/// CPython's default search. An embedded CPython ignores `VIRTUAL_ENV`: naming the venv's
/// interpreter as the executable is what makes `site` find its `pyvenv.cfg`, hence its
/// site-packages. Python installs no signal handlers (the worker owns SIGINT/SIGTERM), and
/// stdout/stderr are unbuffered so that a task's `print` shows up at once in the logs.
pub(crate) fn initialize(python: Option<&Path>) -> Result<(), PythonError> {
    // SAFETY: Py_IsInitialized may be called at any time.
    if unsafe { ffi::Py_IsInitialized() } != 0 {
        return Ok(());
    }
    let executable = executable(python)?;
    let executable = match &executable {
        Some(path) => Some(CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            PythonError::Init(format!(
                "the interpreter path {} contains a NUL byte",
                path.display()
            ))
        })?),
        None => None,
    };
    // SAFETY: called once (guarded by `Py_IsInitialized` and the caller's start lock), before
    // any other use of the C API; the config is initialized by PyConfig_InitPythonConfig and
    // cleared on every path.
    unsafe { init_from_config(executable.as_deref()) }?;
    // The calling (main) thread holds the GIL after initialization: release it, so that the
    // Python threads can run. Its thread state is kept (pyo3 restores it on `attach`).
    // SAFETY: this thread holds the GIL, just acquired by Py_InitializeFromConfig.
    unsafe { ffi::PyEval_SaveThread() };
    Ok(())
}

/// The Python minor version this binary embeds (its libpython), e.g. `3.11`.
pub const BUILT_FOR: &str = env!("DBTASK_BUILT_FOR_PYTHON");

/// The interpreter whose environment to use, made absolute (symlinks kept: a venv's
/// `bin/python` is a symlink, and resolving it would lose the venv): `--python`, else
/// `$VIRTUAL_ENV/bin/python`, else the `python` beside this executable (a worker installed into
/// an environment's `bin/` by `pip install dbtask` embeds that environment's interpreter), else
/// none (CPython's default search). The one named must be of the minor version this binary
/// embeds.
fn executable(python: Option<&Path>) -> Result<Option<PathBuf>, PythonError> {
    let (path, origin) = match python {
        Some(path) => (path.to_path_buf(), "--python"),
        None => match std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
            Some(venv) => (
                PathBuf::from(venv).join("bin").join("python"),
                "$VIRTUAL_ENV",
            ),
            None => match beside_this_executable() {
                Some(path) => (path, "the worker's own bin/ folder"),
                None => return Ok(None),
            },
        },
    };
    let path = std::path::absolute(&path).unwrap_or(path);
    if !path.is_file() {
        return Err(PythonError::Init(format!(
            "the Python interpreter {} (from {origin}) does not exist: pass --python with the \
             venv's python, or activate the venv",
            path.display()
        )));
    }
    check_version(&path, origin)?;
    Ok(Some(path))
}

/// `python` in the folder of this executable, when there is one (`<venv>/bin/python`).
fn beside_this_executable() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let python = exe.parent()?.join("python");
    python.is_file().then_some(python)
}

/// Refuses an interpreter of another minor version than [`BUILT_FOR`]: CPython would start
/// with this binary's libpython and that interpreter's standard library, and fail far from the
/// cause.
fn check_version(python: &Path, origin: &str) -> Result<(), PythonError> {
    let Some(found) = interpreter_version(python) else {
        return Ok(()); // unknown: CPython's own start-up error will have to do
    };
    if found == BUILT_FOR {
        return Ok(());
    }
    Err(PythonError::Init(format!(
        "this dbtask-worker embeds Python {BUILT_FOR}, but the interpreter {} (from {origin}) is \
         Python {found}: install dbtask into that environment with its pip (`pip install \
         dbtask` brings the worker built for Python {found}) and start that environment's \
         dbtask-worker, or use an environment of Python {BUILT_FOR}",
        python.display()
    )))
}

/// The `X.Y` version of an interpreter: from its venv's `pyvenv.cfg` (no process started),
/// else by asking it.
fn interpreter_version(python: &Path) -> Option<String> {
    let cfg = python.parent()?.parent()?.join("pyvenv.cfg");
    if let Ok(text) = std::fs::read_to_string(cfg) {
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if matches!(key.trim(), "version" | "version_info") {
                if let Some(minor) = major_minor(value.trim()) {
                    return Some(minor);
                }
            }
        }
    }
    let out = std::process::Command::new(python)
        .args([
            "-I",
            "-c",
            "import sys; print('%d.%d' % sys.version_info[:2])",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    major_minor(text.trim())
}

/// `3.11` of `3.11.7`, `3.11.7.final.0` or `3.11`.
fn major_minor(version: &str) -> Option<String> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse::<u32>().ok()?;
    let minor = parts.next()?.parse::<u32>().ok()?;
    Some(format!("{major}.{minor}"))
}

/// # Safety
/// Must be called once, before the interpreter exists.
unsafe fn init_from_config(executable: Option<&CStr>) -> Result<(), PythonError> {
    let mut config = MaybeUninit::<ffi::PyConfig>::uninit();
    let config = config.as_mut_ptr();
    // SAFETY: PyConfig_InitPythonConfig fully initializes the struct it is given.
    unsafe { ffi::PyConfig_InitPythonConfig(config) };
    let result = unsafe { configure_and_start(config, executable) };
    // SAFETY: the config was initialized above; clearing frees its strings.
    unsafe { ffi::PyConfig_Clear(config) };
    result
}

/// # Safety
/// `config` points to an initialized `PyConfig`.
unsafe fn configure_and_start(
    config: *mut ffi::PyConfig,
    executable: Option<&CStr>,
) -> Result<(), PythonError> {
    // SAFETY: `config` is valid; the setters copy the strings they are given.
    unsafe {
        (*config).install_signal_handlers = 0;
        (*config).parse_argv = 0;
        (*config).buffered_stdio = 0;
        if let Some(exe) = executable {
            check(
                ffi::PyConfig_SetBytesString(config, &raw mut (*config).program_name, exe.as_ptr()),
                "program_name",
            )?;
            check(
                ffi::PyConfig_SetBytesString(config, &raw mut (*config).executable, exe.as_ptr()),
                "executable",
            )?;
        }
        check(
            ffi::Py_InitializeFromConfig(config),
            "Py_InitializeFromConfig",
        )
    }
}

/// # Safety
/// `status` comes from a PEP 587 call.
unsafe fn check(status: ffi::PyStatus, what: &str) -> Result<(), PythonError> {
    // SAFETY: PyStatus_Exception only reads the status.
    if unsafe { ffi::PyStatus_Exception(status) } == 0 {
        return Ok(());
    }
    let text = |p: *const c_char| {
        // SAFETY: non-null err_msg/func are static C strings set by CPython.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let message = match (text(status.func), text(status.err_msg)) {
        (Some(func), Some(msg)) => format!("{func}: {msg}"),
        (None, Some(msg)) => msg,
        _ if unsafe { ffi::PyStatus_IsExit(status) } != 0 => {
            format!("Python asked to exit with code {}", status.exitcode)
        }
        _ => "unknown error".to_owned(),
    };
    Err(PythonError::Init(format!(
        "{what} failed: {message} (is --python or $VIRTUAL_ENV a working Python environment?)"
    )))
}

/// Puts the current directory, then `extra`, at the front of `sys.path`, and returns
/// `sys.version`.
pub(crate) fn prepare(extra: &[PathBuf]) -> Result<String, PythonError> {
    let cwd = std::env::current_dir()
        .map_err(|e| PythonError::Init(format!("cannot read the current directory: {e}")))?;
    Python::attach(|py| -> PyResult<String> {
        let sys = py.import("sys")?;
        let path = sys.getattr("path")?.cast_into::<PyList>()?;
        let wanted: Vec<&Path> = std::iter::once(cwd.as_path())
            .chain(extra.iter().map(PathBuf::as_path))
            .collect();
        for (index, dir) in wanted.iter().enumerate() {
            let dir = dir.to_string_lossy();
            // Move it to its place if it is there already (a second start, in tests).
            while let Ok(at) = path.index(&*dir) {
                path.del_item(at)?;
            }
            path.insert(index, &*dir)?;
        }
        sys.getattr("version")?.extract()
    })
    .map_err(|e| PythonError::Init(format!("cannot set up sys.path: {e}")))
}

/// Imports asyncio with `ssl` loaded only on first use (`lazy_ssl.py`): OpenSSL and the ssl
/// module are about 4 MiB a worker whose tasks never use TLS does not need. Call before the
/// first import of `dbtask` or a task module. Returns whether ssl was deferred; a failure is
/// logged and leaves the imports to happen as usual.
pub(crate) fn defer_ssl() -> bool {
    let code = CString::new(include_str!("lazy_ssl.py")).expect("lazy_ssl.py has no NUL byte");
    let deferred = Python::attach(|py| -> PyResult<bool> {
        PyModule::from_code(
            py,
            &code,
            c"dbtask-worker/lazy_ssl.py",
            c"_dbtask_worker_ssl",
        )?
        .call_method0("defer")?
        .extract()
    });
    match deferred {
        Ok(deferred) => deferred,
        Err(e) => {
            tracing::warn!(error = %e, "cannot defer loading ssl: importing asyncio as usual");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_a_venv_config_without_starting_python() {
        assert_eq!(major_minor("3.11.7").as_deref(), Some("3.11"));
        assert_eq!(major_minor("3.12.1.final.0").as_deref(), Some("3.12"));
        assert_eq!(major_minor("three"), None);

        let dir = std::env::temp_dir().join(format!("dbtask-venv-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        // `python` is not even executable: the version must come from pyvenv.cfg alone.
        std::fs::write(dir.join("bin/python"), "").unwrap();
        std::fs::write(
            dir.join("pyvenv.cfg"),
            "home = /opt/python/bin\ninclude-system-site-packages = false\nversion = 3.9.18\n",
        )
        .unwrap();
        let python = dir.join("bin/python");
        assert_eq!(interpreter_version(&python).as_deref(), Some("3.9"));
        let err = check_version(&python, "--python").unwrap_err().to_string();
        assert!(err.contains(&format!("embeds Python {BUILT_FOR}")), "{err}");
        assert!(err.contains("is Python 3.9"), "{err}");
        std::fs::write(
            dir.join("pyvenv.cfg"),
            format!("version_info = {BUILT_FOR}.0.final.0\n"),
        )
        .unwrap();
        assert!(check_version(&python, "--python").is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
