-- Runners sharing an engine with interactive users agree on one budget for all batch work: each publishes the one its
-- own step-time fit gives (0: none yet, or nobody else on the engine), and all take the mean (runner/controller.py).
ALTER TABLE runner_loads ADD COLUMN budget REAL NOT NULL DEFAULT 0;
