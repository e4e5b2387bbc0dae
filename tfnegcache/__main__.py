"""`python -m tfnegcache train` / `export`: the MovieLens example's command line
(`tfnegcache_examples.cli`), kept here so the main job starts with one short command."""

from tfnegcache_examples.cli import main

if __name__ == "__main__":
    main()
