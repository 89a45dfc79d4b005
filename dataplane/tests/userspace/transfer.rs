//! Bulk transfers through a service with `kpx-testpod transfer`, against `echo-serve` pods.

#![allow(dead_code)]
