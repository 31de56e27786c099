"""`python -m jaxline --config=path/to/config.py`: see `jaxline.runner`."""

from jaxline import runner

if __name__ == "__main__":
  runner.run()
