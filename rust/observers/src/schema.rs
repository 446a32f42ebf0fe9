//! The declared entity types and how observers are checked against them.

use crate::error::{Error, Result};

/// One `@fraiseql.type`: entity name, table, declared fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityDef {
    pub name: String,
    pub table: String,
    pub fields: Vec<String>,
}

/// `Order` → `tb_order`, `OrderItem` → `tb_order_item`.
pub fn default_table(entity: &str) -> String {
    let mut out = String::from("tb_");
    for (i, c) in entity.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Debug, Clone, Default)]
pub struct Schema {
    entities: Vec<EntityDef>,
}

impl Schema {
    pub fn new(entities: Vec<EntityDef>) -> Result<Schema> {
        let mut schema = Schema::default();
        for e in entities {
            if schema.entity(&e.name).is_some() {
                return Err(Error::Schema(format!(
                    "type `{}` is declared twice",
                    e.name
                )));
            }
            schema.entities.push(e);
        }
        Ok(schema)
    }

    pub fn entities(&self) -> &[EntityDef] {
        &self.entities
    }

    pub fn entity(&self, name: &str) -> Option<&EntityDef> {
        self.entities.iter().find(|e| e.name == name)
    }

    /// The declared entity an observer watches. With no types declared at all (a TOML-only
    /// deployment) nothing can be checked and `None` is returned; otherwise an undeclared
    /// entity is an error with the closest declared name.
    pub fn resolve(&self, observer: &str, entity: &str) -> Result<Option<&EntityDef>> {
        if self.entities.is_empty() {
            return Ok(None);
        }
        if let Some(e) = self.entity(entity) {
            return Ok(Some(e));
        }
        let names: Vec<&str> = self.entities.iter().map(|e| e.name.as_str()).collect();
        let hint = names
            .iter()
            .map(|n| (strsim::jaro_winkler(n, entity), n))
            .filter(|(score, _)| *score >= 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, n)| format!(" (did you mean `{n}`?)"))
            .unwrap_or_else(|| format!("; declared types: {}", names.join(", ")));
        Err(Error::Schema(format!(
            "observer `{observer}` watches entity `{entity}`, which no @fraiseql.type declares{hint}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tables_are_snake_case_with_prefix() {
        assert_eq!(default_table("Order"), "tb_order");
        assert_eq!(default_table("OrderItem"), "tb_order_item");
    }

    #[test]
    fn undeclared_entity_suggests_the_closest() {
        let schema = Schema::new(vec![EntityDef {
            name: "Order".into(),
            table: "tb_order".into(),
            fields: vec!["id".into()],
        }])
        .unwrap();
        let err = schema.resolve("o", "Ordr").unwrap_err().to_string();
        assert!(err.contains("did you mean `Order`?"), "{err}");
        assert!(Schema::default()
            .resolve("o", "Anything")
            .unwrap()
            .is_none());
    }
}
