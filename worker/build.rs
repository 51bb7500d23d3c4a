fn main() {
    // Run against the libpython this binary was built for, not whichever one the loader finds
    // first (a system python3.11 would otherwise shadow the venv's base interpreter).
    pyo3_build_config::add_libpython_rpath_link_args();
    // The Python minor version this binary embeds: checked against the interpreter it is told
    // to use (a venv of another version would fail deep inside CPython's start-up), and shown by
    // `--version`.
    let version = pyo3_build_config::get().version();
    println!(
        "cargo:rustc-env=DBTASK_BUILT_FOR_PYTHON={}.{}",
        version.major, version.minor
    );
}
