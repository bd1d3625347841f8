# bash completion for domsnap(1).
#
# Install: source this file from ~/.bashrc, or copy it to
# /usr/share/bash-completion/completions/domsnap.
#
# Completes subcommands, global and per-subcommand options, and the names the
# agent knows: domains (`domsnap list --json`), a domain's snapshots
# (`domsnap snapshot-list DOMAIN --json`) and operation ids
# (`domsnap operations --json`), asking the agent named by a `-H ADDR` already
# on the command line (else $DOMSNAP_HOST, else the default socket). An agent
# that cannot be reached gives no names, silently, within a few seconds.
#
# The lists below copy the verb table of client/cli.py (VERB_LIST);
# tests/unit/test_docs.py fails when they disagree with it.

_domsnap_commands="list create destroy pause unpause cd-insert cd-eject snapshot-create snapshot-revert snapshot-list snapshot-info snapshot-delete snapshot-prune snapshot-current snapshot-edit snapshot-dumpmanifest group-snapshot-create group-snapshot-revert group-snapshot-list group-snapshot-delete watch cancel operations events info help"

# Accepted before the subcommand and, except --version, after it too.
_domsnap_global_opts="-H --json --utc -t --timeout --request-id --ca --cert --key -h --help"
_domsnap_top_only_opts="--version"

# Options that take a value: the next word is not an option or a positional.
_domsnap_value_opts="-H -t --timeout --request-id --ca --cert --key --name --path --description --parent --rename --since --count --lease --freeze-timeout --label --keep --schedule --prefix"

# The options of one subcommand.
_domsnap_verb_opts() {
    case $1 in
        list) echo "-l --long" ;;
        create) echo "-p --force" ;;
        snapshot-create) echo "--name --live --internal --external --path --description --quiesce --quiesce-best-effort --freeze-timeout --label --dry-run" ;;
        snapshot-revert) echo "--current --running --paused --force --reset-nvram --dry-run" ;;
        snapshot-list) echo "--tree --parent --roots --leaves --name" ;;
        snapshot-delete) echo "--children --dry-run" ;;
        snapshot-prune) echo "--keep --schedule --prefix --dry-run" ;;
        snapshot-edit) echo "--description --rename" ;;
        events) echo "--since --count" ;;
        group-snapshot-create) echo "--live --quiesce --lease" ;;
        group-snapshot-revert) echo "--paused" ;;
    esac
}

# What the positional arguments of one subcommand are, in order; "..." after
# the last one means it repeats. Kinds: domain, snapshot, snapshot-or-file,
# file, file-or-path, setting, operation, command, vdev, name, member (the last
# three: nothing offered).
_domsnap_verb_args() {
    case $1 in
        list) echo "domain..." ;;
        create) echo "file setting..." ;;
        destroy | pause | unpause | snapshot-current | snapshot-prune) echo "domain" ;;
        cd-insert) echo "domain vdev file" ;;
        cd-eject) echo "domain vdev" ;;
        snapshot-create) echo "domain file-or-path..." ;;
        snapshot-revert) echo "domain snapshot-or-file" ;;
        snapshot-list | operations | events) echo "domain" ;;
        snapshot-info | snapshot-delete | snapshot-edit | snapshot-dumpmanifest) echo "domain snapshot" ;;
        group-snapshot-create | group-snapshot-revert | group-snapshot-delete) echo "name member..." ;;
        group-snapshot-list) echo "member..." ;;
        watch | cancel) echo "operation" ;;
        help) echo "command" ;;
    esac
}

# The command line as domsnap will see it: bash splits words at ':' and '='
# (COMP_WORDBREAKS), so `-H unix:/run/x.sock` arrives as four words. Joins
# the pieces that no blank separates in COMP_LINE. Sets the caller's `words`
# and `cword`.
_domsnap_reassemble() {
    words=()
    cword=$COMP_CWORD
    local line=${COMP_LINE-}
    if [[ -z $line ]]; then
        words=("${COMP_WORDS[@]}")
        return
    fi
    local i w n=-1 pos=0 start
    for ((i = 0; i < ${#COMP_WORDS[@]}; i++)); do
        w=${COMP_WORDS[i]}
        start=$pos
        while [[ ${line:pos:1} == [[:space:]] ]]; do
            pos=$((pos + 1))
        done
        if ((i > 0 && pos == start)); then
            words[n]+=$w
        else
            n=$((n + 1))
            words[n]=$w
        fi
        pos=$((pos + ${#w}))
        if ((i == COMP_CWORD)); then
            cword=$n
        fi
    done
}

# Prints the values of one top-level key ("name", "id") of the objects that
# `domsnap [-H ADDR] [--ca/--cert/--key FILE] --json ARGS...` lists, one per line; nothing on failure.
# domsnap prints JSON with an indent of 2, so an object's own keys are the
# lines indented by 4; the names it lists never need JSON escapes.
_domsnap_query() {
    local key=$1
    shift
    local cmd=${words[0]}
    # shellcheck disable=SC2088  # a literal "~/" that bash did not expand
    if [[ $cmd == "~/"* ]]; then
        cmd=$HOME/${cmd#"~/"}
    fi
    local -a run=("$cmd")
    if [[ -n $host ]]; then
        run+=(-H "$host")
    fi
    run+=("${tls[@]}" -t 2 --json "$@")
    if type -P timeout >/dev/null 2>&1; then
        run=(timeout 3 "${run[@]}")
    fi
    "${run[@]}" 2>/dev/null </dev/null |
        sed -n 's/^    "'"$key"'": "\([^"\\]*\)",\{0,1\}$/\1/p'
}

# Adds the words of `compgen ARGS... -- "$cur"` to COMPREPLY, one per line,
# without word splitting or globbing.
_domsnap_add() {
    mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY < <(compgen "$@" -- "$cur")
}

_domsnap_files() {
    compopt -o filenames 2>/dev/null
    _domsnap_add -f
}

_domsnap() {
    local -a words=()
    local cword
    _domsnap_reassemble
    local cur=${words[cword]-}
    COMPREPLY=()

    # The words before the current one: the subcommand, the positionals so
    # far, and the agent's address.
    local verb="" host="" value_for="" w i
    local -a args=() tls=()
    for ((i = 1; i < cword; i++)); do
        w=${words[i]}
        if [[ -n $value_for ]]; then
            if [[ $value_for == -H ]]; then
                host=$w
            elif [[ $value_for == --ca || $value_for == --cert || $value_for == --key ]]; then
                tls+=("$value_for" "$w")
            fi
            value_for=""
            continue
        fi
        case $w in
            -H?*) host=${w#-H} ;;
            -)
                if [[ -z $verb ]]; then verb=$w; else args+=("$w"); fi
                ;;
            -*)
                if [[ " $_domsnap_value_opts " == *" $w "* ]]; then
                    value_for=$w
                fi
                ;;
            *)
                if [[ -z $verb ]]; then verb=$w; else args+=("$w"); fi
                ;;
        esac
    done

    if [[ -n $value_for ]]; then
        # The current word is an option's value.
        if [[ $value_for == --parent && -n ${args[0]-} ]]; then
            _domsnap_add -W "$(_domsnap_query name snapshot-list "${args[0]}")"
        elif [[ $value_for == --path ]]; then
            compopt -o filenames 2>/dev/null
            _domsnap_add -d
        elif [[ $value_for == --ca || $value_for == --cert || $value_for == --key ]]; then
            _domsnap_files
        fi
    elif [[ $cur == -* ]]; then
        local opts=$_domsnap_global_opts
        if [[ -z $verb ]]; then
            opts+=" $_domsnap_top_only_opts"
        else
            opts="$(_domsnap_verb_opts "$verb") $opts"
        fi
        _domsnap_add -W "$opts"
    elif [[ -z $verb ]]; then
        _domsnap_add -W "$_domsnap_commands"
    else
        local -a kinds
        read -r -a kinds <<<"$(_domsnap_verb_args "$verb")"
        local n=${#args[@]} kind=""
        if ((n < ${#kinds[@]})); then
            kind=${kinds[n]}
        elif ((${#kinds[@]} > 0)) && [[ ${kinds[-1]} == *... ]]; then
            kind=${kinds[-1]}
        fi
        case ${kind%...} in
            domain)
                _domsnap_add -W "$(_domsnap_query name list)"
                ;;
            snapshot | snapshot-or-file)
                if [[ -n ${args[0]-} ]]; then
                    _domsnap_add -W "$(_domsnap_query name snapshot-list "${args[0]}")"
                fi
                if [[ $kind == snapshot-or-file || $cur == */* ]]; then
                    _domsnap_files
                fi
                ;;
            file | file-or-path) _domsnap_files ;;
            operation)
                _domsnap_add -W "$(_domsnap_query id operations)"
                ;;
            command)
                _domsnap_add -W "$_domsnap_commands"
                ;;
        esac
    fi

    # The current word as bash split it may be only the tail of `cur`.
    local bash_cur=${COMP_WORDS[COMP_CWORD]-}
    if [[ $cur != "$bash_cur" && $cur == *[:=]* ]]; then
        local prefix=${cur%"${cur##*[:=]}"}
        COMPREPLY=("${COMPREPLY[@]#"$prefix"}")
    fi
    return 0
}

complete -F _domsnap domsnap
