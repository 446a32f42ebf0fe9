//! A table dropped and created again is captured from its first row: every install records,
//! per captured table, the statements that give a new table of that name its capture
//! (`fraiseql_capture_repairs`), and an event trigger at the end of each `CREATE TABLE` runs
//! them in the creating transaction — so no row of the new table goes uncaptured.
//!
//! Event triggers need a superuser. Where the installer is not one, the install goes on
//! without it (a notice, at debug level in the engine's log), and the capture guard
//! ([`super::guard`]) finds and repairs such a table within its check interval, saying which
//! changes may have been missed. A repair that fails never fails the user's `CREATE TABLE`:
//! it is left to the guard.

/// Where the repairs are recorded, one row per captured table.
pub const REPAIRS_TABLE: &str = "fraiseql_capture_repairs";
/// The event trigger and its function.
pub const EVENT_TRIGGER: &str = "fraiseql_capture_on_create";

/// SQL (inside an install's transaction) that records `repairs` — `(quoted table, the
/// statements that capture it)` — and installs the event trigger where the role may.
pub(super) fn register_repairs(repairs: &[(String, String)]) -> String {
    let mut sql = format!(
        r#"
CREATE TABLE IF NOT EXISTS {REPAIRS_TABLE} (
    table_identity text PRIMARY KEY,
    repair         text NOT NULL
);
REVOKE ALL ON {REPAIRS_TABLE} FROM PUBLIC;

CREATE OR REPLACE FUNCTION {EVENT_TRIGGER}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $fraiseql$
DECLARE
    created record;
    fix     text;
BEGIN
    FOR created IN SELECT object_identity FROM pg_event_trigger_ddl_commands()
                   WHERE object_type = 'table' LOOP
        SELECT repair INTO fix FROM {REPAIRS_TABLE} WHERE table_identity = created.object_identity;
        IF fix IS NOT NULL THEN
            BEGIN
                EXECUTE fix;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'fraiseql: could not capture the new table %: %', created.object_identity, SQLERRM;
            END;
        END IF;
    END LOOP;
END
$fraiseql$;

DO $fraiseql$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = '{EVENT_TRIGGER}') THEN
        CREATE EVENT TRIGGER {EVENT_TRIGGER} ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
            EXECUTE FUNCTION {EVENT_TRIGGER}();
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'fraiseql: no event trigger (it needs a superuser); a table created again is found by the engine instead';
END $fraiseql$;
"#
    );
    for (table, repair) in repairs {
        // The quoted name is made of validated characters only: safe inside '…'; the repair
        // is SQL this crate generated from validated names, dollar-quoted.
        sql.push_str(&format!(
            "INSERT INTO {REPAIRS_TABLE} (table_identity, repair) \
             SELECT format('%I.%I', n.nspname, c.relname), $fraiseql_repair${repair}$fraiseql_repair$ \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = '{table}'::regclass \
             ON CONFLICT (table_identity) DO UPDATE SET repair = EXCLUDED.repair;\n"
        ));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_are_recorded_per_table_and_never_fail_the_users_ddl() {
        let sql = register_repairs(&[(
            "\"public\".\"tb_order\"".into(),
            "ALTER PUBLICATION \"fraiseql\" ADD TABLE \"public\".\"tb_order\";".into(),
        )]);
        assert!(sql.contains("WHERE c.oid = '\"public\".\"tb_order\"'::regclass"));
        assert!(sql.contains("$fraiseql_repair$ALTER PUBLICATION"));
        assert!(sql.contains("EXCEPTION WHEN OTHERS THEN"));
        assert!(sql.contains("EXCEPTION WHEN insufficient_privilege THEN"));
    }
}
