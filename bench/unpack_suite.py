"""Unpack the suite.tgz files that bench/gpu_suite.sh brings back, into this checkout, without losing a Table 2 row.

Each call on the GPU machine starts from a fresh copy of this checkout's tracked files, so the runs.jsonl that a
call's archive holds is this checkout's (at the time of the call) plus the records of that call's runs: a plain
`tar xzf` of the second call's archive would drop the first call's rows. This writes every file of each archive in
place, except results/*/runs.jsonl, to which it appends the records this checkout does not hold yet (in the
archives' order), and then rewrites table2.md from it with train_images.write_table2. Every archive is read and
checked before anything is written (a damaged archive, a path outside the repository or a record that is not JSON
stops it with one line, and nothing has changed).

    python bench/unpack_suite.py /work/.device/4/suite.tgz /work/.device/5/suite.tgz    # then git status, commit
"""

import argparse
import json
import os
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_file_atomically  # noqa: E402
from train_images import write_table2  # noqa: E402  (table2.md from runs.jsonl, as the runs write it)

RECORDS = "runs.jsonl"


def read_archive(path):
    """{member path: bytes} for the files of one suite.tgz; SystemExit with one line if it cannot be used."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            files = {}
            for member in archive.getmembers():
                name = os.path.normpath(member.name)
                if member.isdir():
                    continue
                if not member.isfile() or os.path.isabs(name) or name.split(os.sep)[0] == "..":
                    raise SystemExit(f"{path}: {member.name!r} is not a plain file inside the repository; "
                                     "unpack this archive by hand, if at all")
                files[name] = archive.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError) as e:
        raise SystemExit(f"{path}: not a readable suite.tgz ({e}); fetch the call's files again or rerun the call")
    for name, data in files.items():
        if os.path.basename(name) == RECORDS:
            for number, line in enumerate(data.decode().splitlines(), 1):
                try:
                    line.strip() and json.loads(line)
                except json.JSONDecodeError:
                    raise SystemExit(f"{path}: {name} line {number} is not a JSON record; "
                                     "the archive is damaged: fetch the call's files again")
    return files


def write_bytes(path, data):
    write_file_atomically(path, lambda f: f.write(data))


def unpack(archives, root="."):
    """Write the archives' files under root; append new records; rewrite each table2.md. Returns what changed."""
    contents = [(path, read_archive(path)) for path in archives]  # all checked before anything is written
    written, appended = [], {}
    for _, files in contents:
        merged = {os.path.dirname(name) for name in files if os.path.basename(name) == RECORDS}
        for name, data in sorted(files.items()):
            target = os.path.join(root, name)
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            if os.path.basename(name) == RECORDS:
                held = ""
                if os.path.exists(target):
                    with open(target) as f:
                        held = f.read()
                known = {line.strip() for line in held.splitlines()} | {""}  # "": blank lines are no records
                new = [line.strip() for line in data.decode().splitlines() if line.strip() not in known]
                if held and not held.endswith("\n"):
                    held += "\n"
                write_bytes(target, (held + "".join(line + "\n" for line in new)).encode())
                appended[name] = appended.get(name, 0) + len(new)
            elif os.path.basename(name) == "table2.md" and os.path.dirname(name) in merged:
                continue  # one call's table: rewritten below from the merged records instead
            else:
                write_bytes(target, data)
                written.append(name)
    for name in appended:
        write_table2(os.path.join(root, os.path.dirname(name)))
    return written, appended


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("archives", nargs="+", help="suite.tgz files, in the order their calls ran")
    parser.add_argument("--root", default=".", help="the repository root to unpack into (default: here)")
    args = parser.parse_args(argv)
    written, appended = unpack(args.archives, args.root)
    for name in written:
        print(f"wrote {name}")
    for name, count in appended.items():
        print(f"{name}: {count} new record(s) appended; {os.path.join(os.path.dirname(name), 'table2.md')} rewritten")


if __name__ == "__main__":
    main()
