"""python -m bcnswift: print build_info(), the facts a bug report needs."""
import argparse

import bcnswift
from bcnswift import _cli


def main():
    argparse.ArgumentParser(prog="python3 -m bcnswift", description=__doc__ + " The benchmark is python3 -m "
                            "bcnswift.bench, the demo python3 -m bcnswift.demo.").parse_args()
    for key, value in bcnswift.build_info().items():
        print(f"{key:>15}: {', '.join(value) if isinstance(value, list) else value}")


_cli.run(main)
