fn main() {
    // Run against the libpython this binary was built for, not whichever one the loader finds
    // first (a system python3.11 would otherwise shadow the venv's base interpreter).
    pyo3_build_config::add_libpython_rpath_link_args();
}
