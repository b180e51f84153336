"""python -m bcnswift: print build_info(), the facts a bug report needs."""
import bcnswift

for key, value in bcnswift.build_info().items():
    print(f"{key:>15}: {', '.join(value) if isinstance(value, list) else value}")
