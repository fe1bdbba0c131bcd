//! A small builder of ONNX graphs: each call appends one node and returns the name of its
//! output, so a tower reads as the sequence of operators it runs. Weights and constants go in as
//! initializers.

use super::proto::{
    attribute_type, data_type, dimension, AttributeProto, Dimension, GraphProto, NodeProto,
    TensorProto, TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto,
};

/// A node attribute's value.
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// One input or output dimension: fixed, or dynamic under a name (`batch_size`).
pub enum Dim {
    Fixed(usize),
    Named(&'static str),
}

/// The graph being built, in topological order (every node's inputs exist before it).
#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    /// Numbers the generated value names, which are unique within the graph.
    next: usize,
}

fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Named(s) => dimension::Value::DimParam((*s).into()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

impl Graph {
    /// Declares a graph input; returns its name.
    pub fn input(&mut self, name: &str, elem_type: i32, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem_type, dims));
        name.into()
    }

    /// Declares `value` (an existing node output) as the graph output `name`, through an
    /// `Identity` node so the output carries the name callers ask for.
    pub fn output(&mut self, value: &str, name: &str, elem_type: i32, dims: &[Dim]) {
        self.nodes.push(NodeProto {
            input: vec![value.into()],
            output: vec![name.into()],
            name: name.into(),
            op_type: "Identity".into(),
            attribute: Vec::new(),
        });
        self.outputs.push(value_info(name, elem_type, dims));
    }

    /// Appends an `op` node with one output; returns the output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        self.op_n(op, inputs, attrs, 1).remove(0)
    }

    /// Appends an `op` node with `outputs` outputs (`Split`); returns their names.
    pub fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: &[(&str, Attr)],
        outputs: usize,
    ) -> Vec<String> {
        let id = self.next;
        self.next += 1;
        let name = format!("{}_{id}", op.to_ascii_lowercase());
        let output: Vec<String> = (0..outputs).map(|i| format!("{name}:{i}")).collect();
        let attribute = attrs
            .iter()
            .map(|(n, a)| {
                let mut p = AttributeProto {
                    name: (*n).into(),
                    ..Default::default()
                };
                match a {
                    Attr::Int(i) => {
                        p.i = *i;
                        p.r#type = attribute_type::INT;
                    }
                    Attr::Ints(v) => {
                        p.ints = v.clone();
                        p.r#type = attribute_type::INTS;
                    }
                    Attr::Float(f) => {
                        p.f = *f;
                        p.r#type = attribute_type::FLOAT;
                    }
                }
                p
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).into()).collect(),
            output: output.clone(),
            name,
            op_type: op.into(),
            attribute,
        });
        output
    }

    /// An f32 initializer of shape `dims` (row-major `data`); returns its name.
    pub fn weight(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        let raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type::FLOAT,
            name: name.into(),
            raw_data,
        });
        name.into()
    }

    /// A 1-D int64 constant (shapes, axes, indices); returns its name.
    pub fn ints(&mut self, values: &[i64]) -> String {
        let name = format!("const_{}", self.next);
        self.next += 1;
        self.initializers.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: data_type::INT64,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    /// An f32 scalar constant; returns its name.
    pub fn scalar(&mut self, value: f32) -> String {
        let name = format!("const_{}", self.next);
        self.next += 1;
        self.weight(&name, &[], &[value])
    }

    /// The bytes of every initializer so far.
    pub fn weight_bytes(&self) -> u64 {
        self.initializers
            .iter()
            .map(|t| t.raw_data.len() as u64)
            .sum()
    }

    /// The finished graph.
    pub fn finish(self, name: &str, doc: String) -> GraphProto {
        GraphProto {
            node: self.nodes,
            name: name.into(),
            initializer: self.initializers,
            doc_string: doc,
            input: self.inputs,
            output: self.outputs,
        }
    }
}
