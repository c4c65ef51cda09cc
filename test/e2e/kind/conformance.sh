#!/usr/bin/env bash
# conformance.sh runs Kubernetes' own [sig-network] [Conformance] tests
# (e2e.test, built from the same k8s.io/kubernetes as the cluster by
# hack/cri-deps.sh e2e) against the cluster of $KUBECONFIG; run.sh calls it
# with E2E=1, while its kind cluster is up. It prints the pass, fail and
# skip counts and each failure's name and reason; the full log and the
# JUnit report go to bin/kind/e2e/. FOCUS and SKIP override the regular
# expressions that choose the tests.
set -euo pipefail
cd "$(dirname "$0")/../../.."
E2E_BIN=bin/cri/k8s/e2e.test
OUT=bin/kind/e2e
FOCUS=${FOCUS:-'\[sig-network\].*\[Conformance\]'}
SKIP=${SKIP:-'\[Serial\]|\[Disruptive\]'}
[ -n "${KUBECONFIG:-}" ] || { echo "conformance.sh: KUBECONFIG is not set" >&2; exit 2; }
[ -x "$E2E_BIN" ] || { echo "conformance.sh: no $E2E_BIN: run hack/cri-deps.sh e2e" >&2; exit 2; }
rm -rf "$OUT"
mkdir -p "$OUT/tmp"
# e2e.test's temporary files (kubectl's test-kuberc* directories, which
# it leaves behind) go under the run's output, not the machine's /tmp.
export TMPDIR=$PWD/$OUT/tmp
echo "== e2e.test --ginkgo.focus='$FOCUS' --ginkgo.skip='$SKIP'"
t0=$(date +%s)
rc=0
"$E2E_BIN" --kubeconfig="$KUBECONFIG" --provider=skeleton --ginkgo.focus="$FOCUS" --ginkgo.skip="$SKIP" \
	--ginkgo.no-color --ginkgo.junit-report="$OUT/junit.xml" --report-dir="$OUT" --ginkgo.timeout=90m \
	--dump-logs-on-failure=false --e2e-output-dir="$OUT" >"$OUT/e2e.log" 2>&1 || rc=$?
echo "== e2e.test exit $rc after $(($(date +%s) - t0)) s; log: $OUT/e2e.log"
grep -E '^Ran [0-9]+ of [0-9]+ Specs' "$OUT/e2e.log" || true
grep -E '(SUCCESS|FAIL)! -- ' "$OUT/e2e.log" || true
if grep -q '^Summarizing' "$OUT/e2e.log"; then
	sed -n '/^Summarizing/,/^Ran /p' "$OUT/e2e.log" | grep -E '^\s*\[(FAIL|PANICKED|TIMEDOUT)\]' | sed 's/^/  /'
fi
exit "$rc"
