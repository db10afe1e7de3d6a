// Runs a wasm32-wasip1 test binary under Node's WASI, so that filters/core's unit tests also run
// as the WebAssembly Envoy executes. Cargo passes the .wasm path and the test arguments.
// Used as CARGO_TARGET_WASM32_WASIP1_RUNNER by `make test`, with `node --single-threaded`: Node 20
// can crash at exit (SIGSEGV in a concurrent GC thread) after a test grew the wasm memory large.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
import process from 'node:process';

const [file, ...args] = process.argv.slice(2);
const wasi = new WASI({
  version: 'preview1',
  args: [file, ...args],
  env: { RUST_BACKTRACE: '0' },
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(file));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
process.exitCode = wasi.start(instance);
