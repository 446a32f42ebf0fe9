//! The declared entity types and how observers are checked against them.

use crate::error::{Error, Result};

/// One `@fraiseql.type`: entity name, table, declared fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntityDef {
    pub name: String,
    pub table: String,
    pub fields: Vec<String>,
    /// The JSON kind of the fields whose declared type has one (`str` is text, `int`,
    /// `float` and `Decimal` are numbers, `bool` a boolean); the others are not checked.
    pub kinds: Vec<(String, FieldKind)>,
}

impl EntityDef {
    /// The declared JSON kind of `field`, if its type has one.
    pub fn kind(&self, field: &str) -> Option<FieldKind> {
        self.kinds.iter().find(|(f, _)| f == field).map(|(_, k)| *k)
    }
}

/// What a field holds in a captured row, as far as its declared type says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Text,
    Number,
    Boolean,
}

impl FieldKind {
    /// `text`, `number` or `boolean`: the names Python passes and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldKind::Text => "text",
            FieldKind::Number => "number",
            FieldKind::Boolean => "boolean",
        }
    }
}

impl std::str::FromStr for FieldKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<FieldKind, String> {
        match s {
            "text" => Ok(FieldKind::Text),
            "number" => Ok(FieldKind::Number),
            "boolean" => Ok(FieldKind::Boolean),
            other => Err(format!(
                "unknown field kind {other:?} (expected text, number or boolean)"
            )),
        }
    }
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
            kinds: Vec::new(),
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
