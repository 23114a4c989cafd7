//! Harness for Ferry's end-to-end tests: runs the real binaries.
