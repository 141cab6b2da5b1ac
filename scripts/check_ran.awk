# Fails the run when a suite that proves "never twice" ran no test: a cargo
# test binary that compiled to nothing (a feature left out), a test filter
# gone wrong, or Python/chart checks that did not run. Reads the combined log
# of scripts/test.sh. Suites are matched by the test names they print, so it
# does not care how many test binaries there are.
#
# A suite is a pattern over "test NAME ... ok" lines; each must match at
# least one passed test.
BEGIN {
    # Integration tests are modules of one binary (tests/it): their names
    # start with the module's.
    need["failpoints (every durable step failed and crashed at)"] = "^failpoints::(log|slot|compaction|settle|etcd|migrate)_[a-z_]*(fails|crashes)$"
    need["fault harness (replicas, etcd, routers under faults)"] = "^fault_harness::three_replicas_under_faults_never_repeat_or_misalign_a_room$"
    need["fault harness on a three-member etcd cluster"] = "^fault_harness::three_replicas_on_a_three_member_etcd_"
    need["fuzzing of every decoder"] = "^fuzz::"
    need["power-loss property tests"] = "power_loss"
    need["interleavings of replicas"] = "any_interleaving"
}
/^test .* \.\.\. ok$/ {
    name = $2
    for (suite in need) if (name ~ need[suite]) seen[suite]++
}
/^python: / { python += $2; python_skipped += $6 }
# The bounded model check's summary (core/src/model/, run with --nocapture).
/^model: [0-9]+ states, .* 0 violated$/ { model++ }
/^chart: / { chart += $2 }
END {
    bad = 0
    for (suite in need) {
        if (!seen[suite]) { printf "ran no test: %s\n", suite; bad = 1 }
        else printf "ran: %s: %d tests\n", suite, seen[suite]
    }
    if (python == 0) { print "ran no test: python client"; bad = 1 } else printf "ran: python client: %d tests\n", python
    if (chart == 0) { print "ran no test: helm chart"; bad = 1 } else printf "ran: helm chart: %d checks\n", chart
    if (model == 0) { print "ran no test: the bounded model check"; bad = 1 } else print "ran: the bounded model check and its mutants"
    if (python_skipped > 0) { printf "python: %d tests skipped; under CI nothing may be skipped\n", python_skipped; bad = 1 }
    exit bad
}
