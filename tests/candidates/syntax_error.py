from frozen_env.harness import Harness

def main(:
    Harness.from_env()
