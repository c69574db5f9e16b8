-- Deadline-aware admission (batch_gateway/admission.py): each tenant's weight and optional cap on running batches,
-- set with `batch-gateway keys tenant NAME`; tenants without a row have weight 1 and no cap.
CREATE TABLE tenants (
    name text PRIMARY KEY,
    weight double precision NOT NULL DEFAULT 1.0,
    max_running integer
);

-- A running batch's forecast (its runner's projected end, need and risk, JSON), for run_stats, metrics and the
-- projected start of the batches waiting behind it.
ALTER TABLE batches ADD COLUMN forecast jsonb;

-- The load board knows whose batch each runner runs: a tenant's runners on one engine share the tenant's weight.
ALTER TABLE runner_loads ADD COLUMN tenant text NOT NULL DEFAULT '';
