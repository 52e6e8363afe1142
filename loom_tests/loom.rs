#![cfg(writebehind_loom)]
