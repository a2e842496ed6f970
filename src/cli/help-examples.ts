/**
 * The "Examples:" section of every command's --help, kept in one table so a new command is one
 * entry here (test/cli/help.test.ts fails for a command without one).
 */
import type { Command } from 'commander'

const EXAMPLES: Record<string, readonly string[]> = {
  blocksnap: [
    'blocksnap create vm --size 20G',
    'blocksnap snapshot vm@before-upgrade',
    'blocksnap list vm --json',
    'blocksnap merge vm@before-upgrade --rate 24M/s',
    'blocksnap serve vm --listen 127.0.0.1:10809',
    'blocksnap help snapshot',
  ],
  create: [
    'blocksnap create vm --size 20G            # sparse 20 GiB origin',
    'blocksnap create vm --from disk.img         # a copy of disk.img as the origin',
    'blocksnap create vm --origin /dev/vg/lv     # snapshot an existing disk in place',
  ],
  snapshot: [
    'blocksnap snapshot vm@before-upgrade       # 4K chunks, the COW grows on demand',
    'blocksnap snapshot vm@fixed --chunk-size 64K --cow-size 2G --overflow',
    'blocksnap snapshot vm@small --cow-size 20%   # COW of 20% of the origin size',
    'blocksnap snapshot vm@s --json',
  ],
  list: ['blocksnap list vm                          # lvs-like table', 'blocksnap list vm --json'],
  status: ['blocksnap status vm@before-upgrade         # 0 41943040 snapshot 16/2056 16', 'blocksnap status vm --json'],
  read: [
    'blocksnap read vm@before-upgrade --offset 1M --length 1M --output old.bin',
    'blocksnap read vm --length 512 | xxd | head',
  ],
  write: ['blocksnap write vm --offset 4096 --input patch.bin', 'printf hello | blocksnap write vm@scratch --offset 1G'],
  merge: [
    'blocksnap merge vm@before-upgrade          # roll back; Ctrl-C stops, rerun resumes',
    'blocksnap merge vm@s --wait --rate 24M/s   # on a served volume, follow it at 24 MiB/s',
    'blocksnap merge vm@s --json                # progress as JSON lines, then the result',
  ],
  map: ['blocksnap map vm@s', 'blocksnap map vm --json'],
  diff: ['blocksnap diff vm@mon vm@tue                # extents changed between two snapshots', 'blocksnap diff vm@mon vm --json            # since vm@mon, on the live origin'],
  'export-diff': [
    'blocksnap export-diff vm@mon --output mon.full',
    'blocksnap export-diff vm@tue --from mon --output - | ssh backup blocksnap import-diff /backup/vm --input -',
  ],
  'import-diff': ['blocksnap import-diff /backup/vm --input mon.full', 'blocksnap import-diff /backup/vm --input tue.diff --progress'],
  dump: ['blocksnap dump vm@s', 'blocksnap dump vm@s --json'],
  remove: ['blocksnap remove vm@fixed', 'blocksnap remove vm@bad --force          # even when broken or open by NBD clients'],
  import: ['blocksnap import vm@kernel --cow snap-cow.img', 'blocksnap import vm@kernel --cow /dev/vg/snap-cow --in-place'],
  check: ['blocksnap check vm                         # exit 0 clean, 3 damage found', 'blocksnap check vm@s --json'],
  serve: [
    'blocksnap serve vm --listen 127.0.0.1:10809',
    'blocksnap serve vm other --socket /run/blocksnap.sock --write-back 64M --max-pending 512M',
    'blocksnap serve vm --tls-psk keys.psk',
  ],
  start: ['blocksnap start', 'blocksnap start --dir var/test --listen 127.0.0.1:10810'],
  completion: [
    'source <(blocksnap completion bash)        # this shell',
    'blocksnap completion bash > /etc/bash_completion.d/blocksnap',
    'blocksnap completion zsh > "${fpath[1]}/_blocksnap"',
  ],
}

/** Appends the examples to `program`'s help and to each of its commands' help. */
export function addExamples(program: Command): void {
  for (const command of [program, ...program.commands]) {
    const lines = EXAMPLES[command.name()]
    if (lines) command.addHelpText('after', `\nExamples:\n${lines.map((l) => `  ${l}`).join('\n')}\n`)
  }
}
