#!/usr/bin/env bash
# The CPU figures issues 22 and 25 ask for, in one run, with the CPU named: the README's two commands from a fresh
# clone, timed (17 minutes on the 2-core Zen 4 VM of benchmarks/README.md; longer on a slower CPU). Made for a
# 2-core AVX2-only CPU, which no session has had:
#   1. the CPU: model, family/model, clock (BogoMIPS), AVX2 / AVX-512 / AVX512-BF16 / AMX flags, cores; torch's CPU
#      capability and what `--precision auto` picks there.
#   2. a fresh clone of this repository's HEAD in a fresh venv: the install half of the README's test command
#      (timed), then its test half exactly as CI runs it (timed), with a cold torch.compile cache (issue 25 item 8:
#      "about 10 minutes on an AVX2-only 2-core CPU").
#   3. `crappify demo` with fp32 forced (timed, with its table and stage times; issue 22: train-gen >= +1.0 dB
#      PSNR-Y over bicubic, the demo <= 10 minutes), then benchmarks/bench_demo_holdout.py on its generators.
# Output: a new folder $OUT/cpu-check-YYYYmmdd-HHMMSS (OUT default .) holding cpu_check.md and the full logs; a
# folder of that name already there stops it (nothing is overwritten).
# Usage, from the repository root:  bash benchmarks/cpu_check.sh [--skip-suite] [--skip-demo] [--print-commands]
# (`--print-commands`: the install and test halves of the README's test command it would run, one a line; no run)
# To approximate an AVX2-only CPU on an AVX-512 one, export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 first
# (the report records them): the same kernels, not the same speed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
suite=1 demo=1 print=0
for arg in "$@"; do
  case "$arg" in
    --skip-suite) suite=0 ;;
    --skip-demo) demo=0 ;;
    --print-commands) print=1 ;;
    *) echo "cpu_check.sh: unknown argument $arg (valid: --skip-suite, --skip-demo, --print-commands)" >&2; exit 2 ;;
  esac
done
now() { date +%s.%N; }
since() { python3 -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); print(f'{s:.0f} s ({int(s // 60)} min {s % 60:.0f} s)')" "$1" "$(now)"; }
say() { printf '%s\n' "$*" | tee -a "$out"; }

# The README's test command (read by tests/test_readme.py, which keeps it identical to .ci/run), split into its
# install and test halves (CI runs the whole line).
readme_test="$(cd "$root/tests" && python3 -c 'from test_readme import quick_start_commands; print(quick_start_commands()[1])')"
install_cmd="${readme_test%% && *}"
test_cmd="${readme_test#* && }"
if [ "$install_cmd && $test_cmd" != "$readme_test" ] || [[ "$test_cmd" == *"&&"* ]]; then
  echo "cpu_check.sh: the README's test command is no longer 'INSTALL && TEST': $readme_test" >&2; exit 2
fi
if [ "$print" = 1 ]; then
  printf '%s\n%s\n' "$install_cmd" "$test_cmd"; exit 0
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/cpu-check.XXXXXX")"
trap 'cd / && rm -rf "$work"' EXIT  # the clone and its venv (about 7 GB), whatever happens

mkdir -p "${OUT:-.}" 2>/dev/null || { echo "cpu_check.sh: cannot make the output folder ${OUT:-.}" >&2; exit 1; }
dest="$(cd "${OUT:-.}" && pwd)/cpu-check-$(date -u +%Y%m%d-%H%M%S)"
mkdir "$dest" 2>/dev/null || { echo "cpu_check.sh: $dest is already there (or cannot be made); nothing was changed" >&2
  exit 1; }
out="$dest/cpu_check.md"
: > "$out"
say "# cpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$root" rev-parse --short HEAD)"
say ""
say "## The CPU"
say '```'
lscpu | grep -E '^(Model name|CPU family|Model|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|CPU\(s\)|CPU max MHz|BogoMIPS):' | tee -a "$out"
flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
for f in avx2 avx512f avx512_bf16 amx_bf16; do
  case " $flags " in *" $f "*) say "$f: yes" ;; *) say "$f: no" ;; esac
done
say "nproc: $(nproc)"
say "capped: ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-unset} ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-unset}"
say '```'

cd "$work"
git clone -q "$root" crappify
cd crappify
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
t0="$(now)"
eval "$install_cmd" > "$dest/cpu_check_install.log" 2>&1 || {
  echo "cpu_check.sh: the install failed; see $dest/cpu_check_install.log" >&2; exit 1; }
say ""
say "## Fresh clone, fresh venv"
say "- \`$install_cmd\`: $(since "$t0")"
python - <<'EOF' | tee -a "$out"
import torch
from srgan.runtime import auto_precision
print(f"- torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
      f"{torch.get_num_threads()} threads, `--precision auto` picks {auto_precision(torch.device('cpu'))}")
EOF

if [ "$suite" = 1 ]; then
  export TORCHINDUCTOR_CACHE_DIR="$work/inductor-cache"  # cold, as on a fresh CI machine
  t0="$(now)"
  rc=0
  eval "$test_cmd" > "$dest/cpu_check_suite.log" 2>&1 || rc=$?
  say "- \`$test_cmd\` (cold torch.compile cache): $(since "$t0"), exit $rc: $(tail -1 "$dest/cpu_check_suite.log")"
  unset TORCHINDUCTOR_CACHE_DIR
fi

if [ "$demo" = 1 ]; then
  t0="$(now)"
  CRAPPIFY_PRECISION=fp32 crappify demo -o "$work/demo" --quiet > "$dest/cpu_check_demo.log" 2>&1 || {
    echo "cpu_check.sh: the demo failed; see $dest/cpu_check_demo.log" >&2; exit 1; }
  say ""
  say "## \`CRAPPIFY_PRECISION=fp32 crappify demo\`: $(since "$t0")"
  say '```'
  grep -E '^(method|bicubic|train-gen|train-gan|stage times|critic|train-gan vs)' "$dest/cpu_check_demo.log" | tee -a "$out"
  say '```'
  python benchmarks/bench_demo_holdout.py --run "$work/demo" > "$dest/cpu_check_holdout.log" 2>&1
  say ""
  say "## \`benchmarks/bench_demo_holdout.py\` (photos the demo never saw)"
  say '```'
  grep -E '^([0-9]+ images|  [a-z-]+ +[0-9])' "$dest/cpu_check_holdout.log" | tee -a "$out"
  say '```'
fi
echo "cpu_check.sh: wrote $out"
