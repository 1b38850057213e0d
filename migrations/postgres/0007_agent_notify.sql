-- Agent event streams across processes (docs/agent.md, "Streams"): every new thread event and
-- every change of a thread's status notifies `spectral_agent` with the thread's id on commit,
-- so that an API process following a thread that a separate workers process advances is woken
-- at once rather than at its next look. A latency hint only: streams look at the store as
-- well. Expand-only: new functions and triggers that the previous build never calls.

CREATE FUNCTION core.agent_event_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('spectral_agent', NEW.thread);
    RETURN NULL;
END
$$;

CREATE TRIGGER agent_event_notify AFTER INSERT ON core.agent_events
    FOR EACH ROW EXECUTE FUNCTION core.agent_event_notify();

CREATE FUNCTION core.agent_thread_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('spectral_agent', NEW.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER agent_thread_notify AFTER UPDATE OF status ON core.agent_threads
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION core.agent_thread_notify();
