-- The load board: what each batch runner holds on each upstream endpoint, so that runners sharing an engine can tell
-- each other's requests from interactive users' and split the batch share between them (runner/share.py).
CREATE TABLE runner_loads (
    endpoint TEXT NOT NULL,
    owner TEXT NOT NULL,
    inflight INTEGER NOT NULL,
    "limit" INTEGER NOT NULL,
    demand INTEGER NOT NULL,
    completed INTEGER NOT NULL,
    weight REAL NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (endpoint, owner)
);
