#!/usr/bin/env bash
# Fuzz the C ABI with libFuzzer + AddressSanitizer.
#   bash fuzz/run.sh            a long run (10 minutes; pass other libFuzzer flags after --, e.g. -- -max_total_time=3600)
#   bash fuzz/run.sh --smoke    20,000 inputs, as the test suite does
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=.build-fuzz
swift build -c release --product BCNSwiftC --scratch-path "$scratch" \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -enforce-exclusivity=unchecked -Xcc -march=x86-64-v3 >&2
lib=$(swift build -c release --scratch-path "$scratch" --show-bin-path)/libBCNSwiftC.a
runtime=$(dirname "$(dirname "$(readlink -f "$(command -v swiftc)")")")/lib/swift/linux
mkdir -p "$scratch/fuzz"
clang -g -O1 -fsanitize=fuzzer,address -ISources/CBCNSwift/include fuzz/fuzz_abi.c "$lib" \
    -L"$runtime" -Wl,-rpath,"$runtime" -lswiftCore -lswift_Concurrency -lswiftSynchronization -lswiftDispatch \
    -ldispatch -lBlocksRuntime -lswiftGlibc -lm -o "$scratch/fuzz/fuzz_abi" 2> >(grep -v "Cannot export local symbol" >&2)
mkdir -p "$scratch/fuzz/corpus"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
if [ "${1:-}" = "--smoke" ]; then
    exec "$scratch/fuzz/fuzz_abi" -runs=20000 -seed=1 -max_len=512 "$scratch/fuzz/corpus"
fi
[ "${1:-}" = "--" ] && shift
exec "$scratch/fuzz/fuzz_abi" -max_total_time=600 -max_len=512 "$@" "$scratch/fuzz/corpus"
