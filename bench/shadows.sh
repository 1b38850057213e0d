# Shadow versions of `acme-payments` for the HTTP benchmarks (sourced by bench/http.sh and
# bench/threads.sh; docs/impact.md): published from the deployed model, never deployed.
#   variant  the deployed model with `standard-release` answering YELLOW: as costly as the
#            deployed one, differing on one rule
#   hostile  the deployed model plus three rules that run on every decision of the benchmarks'
#            context: one spends the whole operation budget (50 calls of `any_in` over two
#            256-element lists), one overflows an integer, one grows a list past the array bound
# Needs curl and jq; the caller sets API (the world's base URL), AUTH (an authorization header
# with author and deploy scope) and TMP (a scratch directory).

api() { # METHOD PATH [JSON BODY] -> the answer's body; fails on a non-2xx answer
    local args=(-fsS -X "$1" -H "$AUTH" "$API$2")
    [ $# -gt 2 ] && args+=(-H 'content-type: application/json' --data-binary "$3")
    curl "${args[@]}"
}

publish_shadow() { # KIND -> the version published
    local kind=$1 edit deployed
    case $kind in
    variant) edit='(.actions[] | select(.name == "wire_transfer.release") | .rules[]
            | select(.id == "standard-release") | .outcome) = "YELLOW"' ;;
    hostile) edit='.config.burn_a = [range(0; 256)] | .config.burn_b = [range(1000; 1256)]
            | (.actions[] | select(.name == "wire_transfer.release") | .rules) += [
              {id: "burn-operations", text: "Spends the whole operation budget.",
               severity: "T2", outcome: "RED", inputs: ["amount"],
               predicate: ("context.amount > 0 && (" + ([range(0; 50)]
                   | map("any_in(config.burn_a, config.burn_b)") | join(" || ")) + ")"),
               cases: [{context: {amount: 0}, matches: false}]},
              {id: "overflow", text: "Overflows an integer.", severity: "T2", outcome: "RED",
               inputs: ["bank_account_changed_days"],
               predicate: "context.bank_account_changed_days * 4611686018427387904 < 0",
               cases: [{context: {bank_account_changed_days: 0}, matches: false}]},
              {id: "grow-list", text: "Grows a list past the array bound.", severity: "T2",
               outcome: "RED", inputs: ["approvals"],
               predicate: ("context.approvals.len() > 0 && (context.approvals"
                   + ([range(0; 40)] | map(" + config.burn_a") | join("")) + ").len() > 0"),
               cases: [{context: {approvals: []}, matches: false}]}]' ;;
    *) echo "unknown shadow kind '$kind' (variant, hostile)" >&2; return 1 ;;
    esac
    # Each step checked: errexit does not reach into the caller's $(…).
    deployed=$(api GET "" | jq -er .deployed_version) || return 1
    api GET "/versions/$deployed" | jq .model | jq "$edit" >"$TMP/$kind.json" || return 1
    api PUT /draft "$(cat "$TMP/$kind.json")" >/dev/null || return 1
    api POST /versions '{}' | jq -e .version
}
